"""The learner, on every rank: the policy and its optimizer (the actor), the frozen reference, routing replay
and the distillation teacher, and the training prompts (the warm start's answers); it turns a step's scored samples into one RL update, scores samples under a
model, runs the supervised warm start and saves or restores its checkpoint state."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from grpo_megatron.algorithms import POLICY_LOSSES, loss_normalizer
from grpo_megatron.config import CheckpointConfig, TrainConfig
from grpo_megatron.models.provider import PolicyModel
from grpo_megatron.parallel import control_group
from grpo_megatron.platform import device
from grpo_megatron.replay.delivery import EngineRoutes, deliver_engine_routes, take_engine_routes
from grpo_megatron.rollout.data.prompts import PromptDataset
from grpo_megatron.samples import Sample
from grpo_megatron.training import checkpoint as ckpt
from grpo_megatron.training import opd
from grpo_megatron.training.actor import Actor, combine_minibatch_metrics, data_parallel_info, forward_logprobs
from grpo_megatron.training.batch import make_micro_batch, rank_micro_batches, response_span, samples_of_rank
from grpo_megatron.training.metrics import PhaseTimer
from grpo_megatron.training.offload import GenerationMemory
from grpo_megatron.training.reference import ReferenceModel
from grpo_megatron.training.update_math import (
    UpdateSpec, assign_advantages, correct_rollout, loss_mask, minibatch_indices, old_logprobs_are_current,
    policy_loss_fn, select_minibatch_tokens)


@dataclass(frozen=True)
class LearnerSpec:
    """What the learner reads of the run config (training/builder.py builds it from the RunConfig)."""

    update: UpdateSpec
    """The RL update's settings."""
    train: TrainConfig
    """Micro-batching and the supervised warm start."""
    checkpoint: CheckpointConfig
    """What a run checkpoint keeps."""
    hf_path: str
    """model.hf_path: its config and tokenizer go beside each checkpoint."""
    pad_multiple: int
    """Sequences pad to this many tokens (the TP size under sequence parallelism, else 1)."""
    sft_batch_size: int
    """Samples per warm-start step: rollout.prompts_per_step x rollout.group_size, one RL step's."""


class Learner:
    """Every rank's share of the training side. `routing` is the policy's routing replay (MoE policies only),
    `reference` the KL reference (algorithm.kl_coef > 0), `teacher` on-policy distillation's (training/opd.py)."""

    def __init__(self, spec: LearnerSpec, policy: PolicyModel, actor: Actor, memory: GenerationMemory, tokenizer,
                 train_data: PromptDataset | None, routing=None, reference: ReferenceModel | None = None,
                 teacher=None):
        self.spec = spec
        self.policy = policy
        self.actor = actor
        self.memory = memory
        self.tokenizer = tokenizer
        self.pad_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.train_data = train_data
        self.routing = routing
        self.reference = reference
        self.teacher = teacher

    # ------------------------------------------------------------------------------------ passes
    def micro_batches(self, samples: list[Sample], indices: list[int]):
        """This data-parallel rank's micro-batches of `indices`: `train.micro_batch_size` rows each, or with
        `train.max_tokens_per_microbatch` that many padded tokens (every DP rank makes the same number)."""
        train = self.spec.train
        return rank_micro_batches(samples, indices, *data_parallel_info(), train.micro_batch_size, self.pad_id,
                                  self.spec.pad_multiple, train.max_tokens_per_microbatch)

    def logprobs(self, model, samples: list[Sample]) -> dict[int, torch.Tensor]:
        """Per-sample response log-probs under `model` (CPU tensors), available on every last-stage rank.

        Each sample is scored on one data-parallel rank, which writes its values into the sample's span of a
        flat zero buffer on the device; one all-reduce over the DP group completes it (x + 0 == x exactly),
        then a single copy brings it to the CPU."""
        from megatron.core import parallel_state

        micro = self.micro_batches(samples, list(range(len(samples))))
        outputs = forward_logprobs(model, micro, self.spec.update.logprob_temperature)
        if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            return {}
        offsets = [0, *itertools.accumulate(len(s.response_ids) for s in samples)]
        flat = torch.zeros(offsets[-1], dtype=torch.float32, device=device())
        for mb, out in zip(micro, outputs):
            for row, i in enumerate(mb.indices):
                flat[offsets[i]:offsets[i + 1]] = out["logprobs"][row, response_span(samples[i])]
        if data_parallel_info()[1] > 1:
            dist.all_reduce(flat, group=parallel_state.get_data_parallel_group())
        flat = flat.cpu()
        return {i: flat[offsets[i]:offsets[i + 1]].clone() for i in range(len(samples))}

    # ------------------------------------------------------------------------------------ the update
    def update(self, samples: list[Sample], step: int, timer: PhaseTimer,
               routes: EngineRoutes | dict | None = None) -> dict:
        """One RL step's update from `samples` (on every rank); `step`: the steps done before it (seeds the
        covariance losses' token draw). `routes`: the engine's routes as rank 0 took them before the broadcast
        (or their header elsewhere), else they are taken from `samples` here."""
        spec, alg = self.spec.update, self.spec.update.algorithm
        assign_advantages(samples, alg.advantage, spec.group_size)
        if alg.overlong_filter:
            for s in samples:
                s.trainer.in_loss = not s.truncated
        if self.routing:
            self.routing.begin_step(samples, self._engine_routes_of_this_rank(
                samples, routes if routes is not None else self.take_engine_routes(samples)))
        with timer.phase("old_logprobs"):
            if spec.use_engine_logprobs:
                for s in samples:
                    s.trainer.old_logprobs = torch.tensor(s.engine_logprobs, dtype=torch.float32)
            elif old_logprobs_are_current(spec) and alg.rollout_correction.mode == "none":
                for s in samples:
                    s.trainer.old_logprobs = None  # the training pass's own detached log-probs are the old ones
            else:
                old = self.logprobs(self.policy, samples)
                for i, s in enumerate(samples):
                    s.trainer.old_logprobs = old.get(i, torch.zeros(len(s.response_ids)))
            correction_metrics = correct_rollout(samples, spec)
        if self.reference is not None:
            with timer.phase("ref_logprobs"):
                with self.reference.on_device() as reference:
                    ref = self.logprobs(reference, samples)
                for i, s in enumerate(samples):
                    s.trainer.ref_logprobs = ref.get(i, torch.zeros(len(s.response_ids)))
        if self.teacher is not None:
            with timer.phase("teacher"):  # time/teacher: the teacher's scoring time
                opd.score_with_teacher(self, samples)
        results = []
        with timer.phase("train"):
            for m, indices in enumerate(minibatch_indices(len(samples), spec.num_minibatches)):
                whole = make_micro_batch(samples, indices, self.pad_id)
                normalizer = loss_normalizer(loss_mask(samples, whole), alg.loss_agg, spec.max_new_tokens)
                if POLICY_LOSSES.get(alg.loss).needs_selection:
                    select_minibatch_tokens(samples, whole, spec, step, m)
                micro = self.micro_batches(samples, indices)
                for mb in micro:
                    mb.response_mask = loss_mask(samples, mb)
                opd.prepare_training_micro_batches(alg.opd, micro)
                loss_fn = policy_loss_fn(alg, spec.max_new_tokens, normalizer, m == 0, bool(self.teacher))
                results.append(self.actor.train_step(micro, loss_fn, spec.logprob_temperature))
        metrics = combine_minibatch_metrics(results)
        metrics["lr"] = self.actor.lr
        metrics.update(correction_metrics)
        if self.routing:
            metrics.update(self.routing.end_step())
        return {("train/" + k if "/" not in k else k): v for k, v in metrics.items()}

    def sft_warmup(self) -> list[float]:
        """`train.sft_warmup_steps` supervised steps on the training set's answers (training/sft.py)."""
        from grpo_megatron.training.sft import sft_warmup

        return sft_warmup(self) if self.spec.train.sft_warmup_steps > 0 else []

    # ------------------------------------------------------------------------------------ routing replay
    def take_engine_routes(self, samples: list[Sample]) -> EngineRoutes | None:
        """The engine's routes, taken off `samples` (rank 0, before the broadcast); None without routing replay."""
        routing = self.routing
        if not routing:
            return None
        return take_engine_routes(samples, routing.num_moe_layers, routing.topk, routing.num_experts,
                                  required=routing.mode == "r3")

    def samples_of_this_rank(self, samples: list[Sample]) -> list[int]:
        """Every sample this data-parallel rank runs through the policy this step (log-prob and training
        passes): the ones whose engine routes it needs."""
        passes = [list(range(len(samples))), *minibatch_indices(len(samples), self.spec.update.num_minibatches)]
        return samples_of_rank(samples, passes, *data_parallel_info())

    def _engine_routes_of_this_rank(self, samples: list[Sample], routes: EngineRoutes):
        """This rank's share of the engine's routes (None when the engine returned none: every rank knows
        that from the broadcast header, so no collective runs)."""
        if routes.table is None and routes.problem is None:
            return None
        return deliver_engine_routes(routes, samples, self.samples_of_this_rank(samples), self.routing.local_layers,
                                     self.routing.topk, self.routing.num_experts, control_group())

    # ------------------------------------------------------------------------------------ checkpoint
    def save(self, run_dir: Path, step: int, state: dict) -> Path:
        """A run checkpoint of the policy, optimizer and LR schedule, with `state` (the rollout side's) beside."""
        self.memory.onload()  # the optimizer state is read; the next generation gives it back again
        state = {"scheduler": self.actor.scheduler.state_dict(), **state}
        return ckpt.save_run_checkpoint(run_dir, step, self.policy, self.actor.optimizer, state,
                                        self.spec.hf_path, self.spec.checkpoint.keep_last,
                                        self.spec.checkpoint.optimizer_format)

    def load(self, path: Path) -> dict:
        """Policy, optimizer and LR schedule from the checkpoint at `path`; returns its whole trainer state."""
        state = ckpt.load_run_checkpoint(path, self.policy, self.actor.optimizer)
        self.actor.scheduler.load_state_dict(state["scheduler"])
        return state
