"""The RL loop. One step:

prompts -> rollout engine (G samples each) -> rewards -> [dynamic sampling refill] -> group advantages
-> old-policy log-probs -> [reference log-probs] -> num_minibatches optimizer steps -> weight sync.

Rank 0 drives the rollout engine and broadcasts the step's samples; every rank then runs the same
megatron passes on its share of the data. The rollout side (training/rollout_worker.py) runs inline in
rollout.mode sync, or on a thread that fills a buffer (training/buffer.py) in one_step_off and async;
this file is the training side and the step's order: take a batch, train, push weights, evaluate, save.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from grpo_megatron.algorithms import (
    ADVANTAGE_ESTIMATORS, MAX_LOG_RATIO, POLICY_LOSSES, LossParams, adaptive_truncation_bound, aggregate_loss,
    compute_policy_loss, compute_rollout_correction, loss_normalizer, overlong_reward_penalty, pass_at_k, select_tokens)
from grpo_megatron.algorithms.rollout_correction import unit_values
from grpo_megatron.config import RunConfig, save_config, to_dict
from grpo_megatron.models import build_model, load_hf_config, load_hf_weights, model_dims
from grpo_megatron.models.mcore_checkpoint import dtype_from_name, load_mcore_checkpoint
from grpo_megatron.models.tokenizer import load_tokenizer
from grpo_megatron.platform import device
from grpo_megatron.process_setup import stop_signal_received
from grpo_megatron.models.bridge import MOE_MODEL_TYPES
from grpo_megatron.parallel import control_group, init_distributed, init_model_parallel
from grpo_megatron.ranks import is_rank0, multi_rank
from grpo_megatron.replay import attach_routing_replay
from grpo_megatron.replay.delivery import (
    EngineRoutes, deliver_engine_routes, route_header, take_engine_routes)
from grpo_megatron.rollout.base import SamplingParams
from grpo_megatron.rollout.data import PromptDataset, PromptLoader
from grpo_megatron.rollout.functions import RolloutContext, generate_samples
from grpo_megatron.samples import Sample
from grpo_megatron.training import checkpoint as ckpt
from grpo_megatron.training import opd
from grpo_megatron.training.actor import (
    Actor, combine_minibatch_metrics, data_parallel_info, forward_logprobs)
from grpo_megatron.training.batch import (
    make_micro_batch, rank_micro_batches, response_span, samples_of_rank)
from grpo_megatron.rollout.engines import make_engine
from grpo_megatron.training.metrics import MetricsLogger, PhaseTimer
from grpo_megatron.training.reference import ReferenceModel
from grpo_megatron.training.mismatch import rollout_correction_metrics, train_rollout_mismatch
from grpo_megatron.training.offload import GenerationMemory
from grpo_megatron.training.prompt_log import PromptLog
from grpo_megatron.rollout.rewards.runner import RewardRunner
from grpo_megatron.training.weight_push import release_rollout_memory
from grpo_megatron.training.rollout_worker import RolloutWorker

logger = logging.getLogger(__name__)


_EVAL_SEED_OFFSET = 1 << 30
"""Sampled evaluation draws with seed offsets from here (one per eval file), apart from the rollouts' offsets."""


def _eval_names(files: list[str]) -> dict[str, str]:
    """Metric name -> eval file: the file's stem, with `_<i>` added where two files share a stem."""
    stems = [Path(f).stem for f in files]
    return {(stem if stems.count(stem) == 1 else f"{stem}_{i}"): f for i, (stem, f) in enumerate(zip(stems, files))}


_rank0 = is_rank0  # the loop's short name for the shared helper


def _broadcast(obj):
    """Rank 0's `obj` on every rank, through the control group: gloo with a timeout long enough for the
    other ranks to wait out a rollout (an NCCL wait that long trips its watchdog)."""
    if not multi_rank():
        return obj
    box = [obj if _rank0() else None]
    dist.broadcast_object_list(box, src=0, group=control_group())
    return box[0]


class Trainer:
    teacher = None  # on-policy distillation's teacher (training/opd.py), when algorithm.opd.teacher is set

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        init_distributed(control_timeout_minutes=cfg.train.rollout_wait_minutes)
        torch.manual_seed(cfg.train.seed)
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        self.hf_config = load_hf_config(cfg.model.hf_path)
        self.tokenizer = load_tokenizer(cfg.model.hf_path)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.dtype = dtype_from_name(cfg.model.dtype)
        self._check_replay_config()
        init_model_parallel(cfg.parallel, seed=cfg.train.seed, **model_dims(self.hf_config))
        self.tp_size = cfg.parallel.tensor_parallel
        self._check_minibatch_split()
        self.policy = self._build(wrap_ddp=True)
        self._load_initial_weights(self.policy)
        self.actor = Actor(self.policy, cfg.train, total_steps=cfg.train.steps * cfg.train.num_minibatches)
        sglang = cfg.rollout.sglang  # colocated GPU servers share the trainer's GPUs while they generate
        self.memory = GenerationMemory(self.policy.chunks, self.actor.optimizer, offload_params=cfg.train.offload_params,
                                       active=cfg.rollout.engine == "sglang" and sglang.colocated and sglang.gpu_servers)
        self.routing = attach_routing_replay(self.policy, cfg.algorithm.routing_replay) if self.policy.is_moe else None
        self.reference = None
        if cfg.algorithm.kl_coef > 0:
            reference = self._build(wrap_ddp=False)
            self._load_initial_weights(reference)
            self.reference = ReferenceModel(reference, offload=cfg.model.offload_reference)
        self.teacher = opd.build_teacher(cfg, self.dtype, self.hf_config.vocab_size)  # on-policy distillation
        self.train_data = PromptDataset(cfg.data.train_files, self.tokenizer, cfg.data.apply_chat_template,
                                        cfg.data.max_prompt_tokens)
        self.loader = PromptLoader(self.train_data, cfg.rollout.prompts_per_step, seed=cfg.train.seed,
                                   shuffle=cfg.data.shuffle)
        self.eval_sets = {name: PromptDataset([path], self.tokenizer, cfg.data.apply_chat_template,
                                              cfg.data.max_prompt_tokens)
                          for name, path in _eval_names(cfg.data.eval_files).items()}
        self.rewards = RewardRunner(cfg.reward)
        self.engine = make_engine(cfg, self.dtype) if _rank0() else None
        self.worker = RolloutWorker(cfg, self.loader, self._generate_groups, self._score, self.sampling_params,
                                    self.rewards.end_step, lambda: self.engine.weight_version)
        self.step = 0
        resume_from = ckpt.latest_checkpoint(self.run_dir) if cfg.checkpoint.resume else None
        if resume_from is not None:
            self._resume(resume_from)
        if _rank0():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            self.metrics = MetricsLogger(self.run_dir, cfg.logging.tensorboard, cfg.logging.wandb,
                                         cfg.logging.wandb_project, to_dict(cfg),
                                         resume_step=self.step if resume_from is not None else None)
            self.prompt_log = PromptLog(self.run_dir, self.step if resume_from is not None else None)

    # ------------------------------------------------------------------------------------ set-up
    def _check_replay_config(self) -> None:
        from grpo_megatron.preflight import check_replay

        check_replay(self.cfg, self.hf_config.model_type)

    def _check_minibatch_split(self) -> None:
        from grpo_megatron.config import ConfigError

        r, dp_size = self.cfg.rollout, data_parallel_info()[1]
        per_minibatch = r.prompts_per_step * r.group_size // self.cfg.train.num_minibatches
        if per_minibatch < dp_size:
            raise ConfigError(f"a mini-batch of {per_minibatch} samples leaves some of the {dp_size} data-parallel "
                              f"ranks without one: raise rollout.prompts_per_step or lower train.num_minibatches")

    def _build(self, wrap_ddp: bool):
        overrides = {}
        if self.cfg.model.recompute_activations:
            overrides.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
        if wrap_ddp and self.hf_config.model_type in MOE_MODEL_TYPES:
            overrides["moe_enable_routing_replay"] = True  # the policy's replay hooks (grpo_megatron.replay)
        ddp = None
        if wrap_ddp:
            from megatron.core import parallel_state

            from grpo_megatron.platform import use_distributed_optimizer

            dp_size = parallel_state.get_data_parallel_world_size()
            ddp = {"use_distributed_optimizer": use_distributed_optimizer(self.cfg.train.distributed_optimizer, dp_size)}
        return build_model(self.hf_config, self.cfg.parallel, self.dtype, wrap_ddp=wrap_ddp, ddp_overrides=ddp,
                           freeze=self.cfg.train.freeze if wrap_ddp else None, **overrides)

    def _load_initial_weights(self, model) -> None:
        if self.cfg.model.megatron_path:
            load_mcore_checkpoint(model, self.cfg.model.megatron_path)
        else:
            load_hf_weights(model, self.cfg.model.hf_path)

    def _resume(self, path: Path) -> None:
        state = ckpt.load_run_checkpoint(path, self.policy, self.actor.optimizer)
        self.step = state["step"]
        self.actor.scheduler.load_state_dict(state["scheduler"])
        self.worker.load_state_dict({**state.get("rollout", {}), "loader": state["loader"]}, version=self.step)
        self.sync_weights()
        if _rank0():
            logger.info("resumed from %s at step %d", path, self.step)

    def save_checkpoint(self) -> Path:
        self.memory.onload()  # the optimizer state is read; the next generation gives it back again
        rollout = self.worker.state_dict()  # buffer, draws to re-issue and the cursor, at one moment
        state = {"scheduler": self.actor.scheduler.state_dict(), "loader": rollout.pop("loader"), "rollout": rollout}
        return ckpt.save_run_checkpoint(self.run_dir, self.step, self.policy, self.actor.optimizer, state,
                                        self.cfg.model.hf_path, self.cfg.checkpoint.keep_last,
                                        self.cfg.checkpoint.optimizer_format)

    # ------------------------------------------------------------------------------------ rollout
    def sampling_params(self, seed_offset: int, greedy: bool = False, n: int | None = None,
                        max_new_tokens: int | None = None) -> SamplingParams:
        """Sampling settings with a seed fixed by (run seed, offset): a resumed run draws the same samples."""
        r = self.cfg.rollout
        return SamplingParams(
            max_new_tokens=max_new_tokens or r.max_new_tokens, temperature=0.0 if greedy else r.temperature,
            top_p=r.top_p, top_k=r.top_k, stop_token_ids=list(r.stop_token_ids),
            n=n or r.group_size, seed=self.cfg.train.seed * 1_000_003 + seed_offset)

    def _generate_groups(self, items, params, first_group: int) -> list[Sample]:
        """Prompt items -> samples through `rollout.function` (single turn, the tool loop or a user's)."""
        context = RolloutContext(self.tokenizer, self.cfg.rollout, self.cfg.algorithm.routing_replay == "r3",
                                 self.cfg.rollout.function_options)
        return generate_samples(self.engine, items, params, context, first_group)

    def _score(self, samples: list[Sample]) -> tuple[int, int]:
        """Set each sample's reward; returns (failed, total) reward calls."""
        texts = self.tokenizer.batch_decode([s.response_ids for s in samples], skip_special_tokens=True)
        prompts = self.tokenizer.batch_decode([s.prompt_ids for s in samples], skip_special_tokens=True)
        rewards = self.rewards.score(prompts, texts, [s.answer for s in samples], [s.meta for s in samples])
        if self.cfg.reward.overlong_penalty:
            lengths = torch.tensor([len(s.response_ids) for s in samples], dtype=torch.float32)
            penalty = overlong_reward_penalty(lengths, self.cfg.rollout.max_new_tokens,
                                              self.cfg.reward.overlong_cache_tokens)
            rewards = [r + float(p) for r, p in zip(rewards, penalty)]
        for sample, reward in zip(samples, rewards):
            sample.reward = reward
        return self.rewards.last_failed, self.rewards.last_calls

    def rollout(self) -> tuple[list[Sample], dict]:
        """Rank 0: this step's batch, generated now (rollout.mode sync)."""
        return self.worker.rollout_now(self.step)

    # ------------------------------------------------------------------------------------ training
    def _advantages(self, samples: list[Sample]) -> None:
        rewards = torch.tensor([s.reward for s in samples], dtype=torch.float64)
        advantages = ADVANTAGE_ESTIMATORS.get(self.cfg.algorithm.advantage)(rewards, self.cfg.rollout.group_size)
        for sample, adv in zip(samples, advantages.tolist()):
            sample.advantage = adv

    def _pad_multiple(self) -> int:
        return self.tp_size if self.cfg.parallel.sp else 1

    def _micro_batches(self, samples: list[Sample], indices: list[int]):
        """This data-parallel rank's micro-batches of `indices`: `train.micro_batch_size` rows each, or with
        `train.max_tokens_per_microbatch` that many padded tokens (every DP rank makes the same number)."""
        train = self.cfg.train
        return rank_micro_batches(samples, indices, *data_parallel_info(), train.micro_batch_size, self.pad_id,
                                  self._pad_multiple(), train.max_tokens_per_microbatch)

    def _logprob_pass(self, model, samples: list[Sample]) -> dict[int, torch.Tensor]:
        """Per-sample response log-probs under `model` (CPU tensors), available on every last-stage rank.

        Each sample is scored on one data-parallel rank, which writes its values into the sample's span of a
        flat zero buffer on the device; one all-reduce over the DP group completes it (x + 0 == x exactly),
        then a single copy brings it to the CPU."""
        from megatron.core import parallel_state

        micro = self._micro_batches(samples, list(range(len(samples))))
        outputs = forward_logprobs(model, micro, self.cfg.rollout.temperature or 1.0)
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

    def _loss_fn(self, normalizer: float, first_minibatch: bool):
        alg = self.cfg.algorithm
        max_len = self.cfg.rollout.max_new_tokens

        def loss_fn(mb, logprobs, entropy):
            # No old-policy pass (see _old_logprobs_are_current): the policy is still the old one.
            old_logprobs = mb.old_logprobs if mb.old_logprobs is not None else logprobs.detach()
            advantages, opd_metrics = (opd.distillation_advantages(alg.opd, mb, old_logprobs) if self.teacher
                                       else (mb.advantages, {}))
            loss, metrics = compute_policy_loss(
                logprobs, old_logprobs, advantages, mb.response_mask, variant=alg.loss,
                clip_low=alg.clip_low, clip_high=alg.clip_high, loss_agg=alg.loss_agg,
                ref_logprobs=mb.ref_logprobs, kl_coef=alg.kl_coef, kl_estimator=alg.kl_estimator,
                dual_clip_c=alg.dual_clip_c, entropy=entropy, normalizer=normalizer, max_response_length=max_len,
                is_weights=mb.rollout_weights, params=LossParams(**dataclasses.asdict(alg.loss_params)),
                token_selection=mb.loss_selection)
            if first_minibatch and mb.engine_logprobs is not None:
                metrics.update(train_rollout_mismatch(logprobs.detach(), mb.engine_logprobs, mb.response_mask))
            if self.teacher and alg.opd.top_k:
                topk_loss, topk_metrics = opd.topk_distillation_loss(alg.opd, mb, partial(
                    aggregate_loss, response_mask=mb.response_mask.bool(), loss_agg=alg.loss_agg,
                    normalizer=normalizer, max_response_length=max_len))
                loss, metrics = loss + topk_loss, {**metrics, **topk_metrics}
            return loss, {**metrics, **opd_metrics}

        return loss_fn

    def train_on(self, samples: list[Sample], timer: PhaseTimer, routes: EngineRoutes | None = None) -> dict:
        """One RL step's update from `samples` (on every rank); `routes`: the engine's routes as train_step
        took them on rank 0 (or their header elsewhere), else they are taken from `samples` here."""
        cfg, alg = self.cfg, self.cfg.algorithm
        self._advantages(samples)
        if alg.overlong_filter:
            for s in samples:
                s.meta["_in_loss"] = not s.truncated
        if self.routing:
            self.routing.begin_step(samples, self._engine_routes_of_this_rank(
                samples, routes if routes is not None else self._take_engine_routes(samples)))
        with timer.phase("old_logprobs"):
            if cfg.rollout.use_engine_logprobs:
                for s in samples:
                    s.old_logprobs = torch.tensor(s.engine_logprobs, dtype=torch.float32)
            elif self._old_logprobs_are_current() and alg.rollout_correction.mode == "none":
                for s in samples:
                    s.old_logprobs = None  # the training pass's own detached log-probs are the old ones
            else:
                old = self._logprob_pass(self.policy, samples)
                for i, s in enumerate(samples):
                    s.old_logprobs = old.get(i, torch.zeros(len(s.response_ids)))
            correction_metrics = self._correct_rollout(samples)
        if self.reference is not None:
            with timer.phase("ref_logprobs"):
                with self.reference.on_device() as reference:
                    ref = self._logprob_pass(reference, samples)
                for i, s in enumerate(samples):
                    s.ref_logprobs = ref.get(i, torch.zeros(len(s.response_ids)))
        if self.teacher is not None:
            with timer.phase("teacher"):  # time/teacher: the teacher's scoring time
                opd.score_with_teacher(self, samples)
        results = []
        with timer.phase("train"):
            for m, indices in enumerate(self._minibatches(len(samples))):
                whole = make_micro_batch(samples, indices, self.pad_id)
                normalizer = loss_normalizer(self._loss_mask(samples, whole), alg.loss_agg, cfg.rollout.max_new_tokens)
                if POLICY_LOSSES.get(alg.loss).needs_selection:
                    self._select_tokens(samples, whole, m)
                micro = self._micro_batches(samples, indices)
                for mb in micro:
                    mb.response_mask = self._loss_mask(samples, mb)
                opd.prepare_training_micro_batches(alg.opd, micro)
                results.append(self.actor.train_step(micro, self._loss_fn(normalizer, m == 0),
                                                     cfg.rollout.temperature or 1.0))
        metrics = combine_minibatch_metrics(results)
        metrics["lr"] = self.actor.lr
        metrics.update(correction_metrics)
        if self.routing:
            metrics.update(self.routing.end_step())
        return {("train/" + k if "/" not in k else k): v for k, v in metrics.items()}

    def _select_tokens(self, samples: list[Sample], whole, minibatch: int) -> None:
        """clip_cov / kl_cov: the tokens their loss singles out, over the whole mini-batch (its covariance
        spans every micro-batch and data-parallel rank), from the old log-probs, with a draw seeded by (seed,
        step, mini-batch) so that every rank selects the same; each sample keeps its share."""
        alg = self.cfg.algorithm
        seed = (self.cfg.train.seed * 1_000_003 + self.step) * 1009 + minibatch
        selected = select_tokens(alg.loss, whole.old_logprobs, whole.advantages, self._loss_mask(samples, whole),
                                 LossParams(**dataclasses.asdict(alg.loss_params)), torch.Generator().manual_seed(seed))
        for row, i in enumerate(whole.indices):
            samples[i].loss_selection = selected[row, response_span(samples[i])].float()

    def _minibatches(self, count: int) -> list[list[int]]:
        """The sample indices of each optimizer step of a rollout batch of `count` samples."""
        per_minibatch = count // self.cfg.train.num_minibatches
        return [list(range(m * per_minibatch, (m + 1) * per_minibatch)) for m in range(self.cfg.train.num_minibatches)]

    def _samples_of_this_rank(self, samples: list[Sample]) -> list[int]:
        """Every sample this data-parallel rank runs through the policy this step (log-prob and training
        passes): the ones whose engine routes it needs."""
        passes = [list(range(len(samples))), *self._minibatches(len(samples))]
        return samples_of_rank(samples, passes, *data_parallel_info())

    def _engine_routes_of_this_rank(self, samples: list[Sample], routes: EngineRoutes):
        """This rank's share of the engine's routes (None when the engine returned none: every rank knows
        that from the broadcast header, so no collective runs)."""
        if routes.table is None and routes.problem is None:
            return None
        return deliver_engine_routes(routes, samples, self._samples_of_this_rank(samples), self.routing.local_layers,
                                     self.routing.topk, self.routing.num_experts, control_group())

    def _take_engine_routes(self, samples: list[Sample]) -> EngineRoutes:
        routing = self.routing
        return take_engine_routes(samples, routing.num_moe_layers, routing.topk, routing.num_experts,
                                  required=routing.mode == "r3")

    def _old_logprobs_are_current(self) -> bool:
        """True when the old-policy pass would recompute what the training pass computes anyway.

        With one optimizer step per rollout batch, the training pass runs the not-yet-updated policy on the
        same micro-batches, so its detached log-probs equal the old ones exactly; only routing replay needs
        the separate pass (r2 records its routes there, r3 measures rollout-vs-train agreement there), and the
        covariance losses, which select their tokens from the old log-probs before the first micro-batch.
        """
        return (self.cfg.train.num_minibatches == 1 and self.cfg.algorithm.routing_replay == "none"
                and not POLICY_LOSSES.get(self.cfg.algorithm.loss).needs_selection)

    @staticmethod
    def _loss_mask(samples: list[Sample], mb) -> torch.Tensor:
        """Response tokens in the loss: sampled (not tool output), not overlong-filtered, not dropped by the
        mismatch correction."""
        keep = torch.tensor([float(samples[i].meta.get("_in_loss", True)) for i in mb.indices])
        mask = mb.response_mask * keep.unsqueeze(1)
        if mb.loss_mask is not None:
            mask = mask * mb.loss_mask
        return mask if mb.rollout_weights is None else mask * (mb.rollout_weights > 0)

    def _correct_rollout(self, samples: list[Sample]) -> dict:
        """Decoupled mismatch correction: weights from the trainer's old and the engine's log-probs on every
        sample (`rollout_weights`, 0 where dropped), and the step's `rollout_correction/*` metrics, over the
        whole step so that neither depends on the mini- or micro-batch split. Metrics only with mode none,
        and nothing where old log-probs are the engine's (bypass) or come from the training pass itself."""
        rc = self.cfg.algorithm.rollout_correction
        for s in samples:
            s.rollout_weights = None
        if self.cfg.rollout.use_engine_logprobs or any(s.old_logprobs is None for s in samples):
            return {}
        if any(s.engine_logprobs is None for s in samples):
            if rc.mode != "none":
                raise RuntimeError("algorithm.rollout_correction needs the engine's per-token log-probs, and the "
                                   "rollout engine returned none: set algorithm.rollout_correction.mode none")
            return {}
        pad = torch.nn.utils.rnn.pad_sequence
        old = pad([s.old_logprobs.float() for s in samples], batch_first=True)
        rollout = pad([torch.tensor(s.engine_logprobs, dtype=torch.float32) for s in samples], batch_first=True)
        lengths = torch.tensor([len(s.response_ids) for s in samples])
        in_loss = torch.tensor([bool(s.meta.get("_in_loss", True)) for s in samples])
        sampled = pad([torch.tensor(s.loss_mask or [1] * len(s.response_ids), dtype=torch.bool) for s in samples],
                      batch_first=True)  # tool output has no behaviour log-prob to correct
        mask = (torch.arange(old.shape[1]) < lengths.unsqueeze(1)) & in_loss.unsqueeze(1) & sampled
        if rc.mode == "none":
            return self._from_last_stage(rollout_correction_metrics(old, rollout, mask, level=rc.level))
        correct = partial(compute_rollout_correction, old, rollout, mask, mode=rc.mode, level=rc.level, low=rc.low,
                          veto=rc.veto, max_seq_kl=rc.max_seq_kl)
        correction, bound = correct(high=rc.high), (rc.high if rc.mode == "tis" else None)
        if rc.adaptive_ess_target is not None:
            unit_weights = unit_values(correction.log_unit, correction.keep, rc.level).clamp(max=MAX_LOG_RATIO).exp()
            bound = adaptive_truncation_bound(unit_weights, rc.high, rc.adaptive_ess_target)
            correction = correct(high=bound)
        for s, row in zip(samples, correction.weights):
            s.rollout_weights = row[:len(s.response_ids)].clone()
        return self._from_last_stage(rollout_correction_metrics(old, rollout, mask, correction, rc.level, bound))

    @staticmethod
    def _from_last_stage(metrics: dict) -> dict:
        """Metrics that only last pipeline stages can compute (the others hold no old log-probs), on every rank."""
        if not multi_rank() or not metrics:
            return metrics
        from megatron.core import parallel_state

        from grpo_megatron.platform import device

        values = torch.tensor(list(metrics.values()), dtype=torch.float64, device=device())
        if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            values.fill_(float("-inf"))
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return dict(zip(metrics, values.tolist()))

    # ------------------------------------------------------------------------------------ sync / eval
    def sync_weights(self, verify: bool = True) -> None:
        """Stream the policy to the engine in buckets (training/weight_push.py); every rank takes part.
        `verify=False`: the engine's post-sync probe waits for engine.verify_push()."""
        from grpo_megatron.training.weight_push import WeightPush

        if getattr(self, "_weight_push", None) is None:
            self._weight_push = WeightPush(self.cfg, self.engine)
        self._weight_push.run(self.policy, version=self.step, verify=verify)

    def evaluate(self) -> dict:
        """Held-out evaluation on rank 0 (the engine has the current weights), each eval file on its own:
        `eval/<file stem>/accuracy` and `reward_mean` of greedy responses and, with eval.num_samples = k,
        `avg@k` (accuracy over the k sampled responses of every prompt) and unbiased `pass@j` for
        j = 1, 2, 4, ... up to k. `eval/accuracy` and `eval/reward_mean` pool the greedy results of all files."""
        if not self.eval_sets or not _rank0():
            return {}
        with self.worker.engine_access() if self._background() else nullcontext():
            return self._evaluate()

    def _evaluate(self) -> dict:
        cfg, threshold = self.cfg.eval, self.cfg.reward.correct_threshold
        greedy = self.sampling_params(0, greedy=True, n=1, max_new_tokens=cfg.max_new_tokens)
        metrics, pooled = {}, []
        for index, (name, data) in enumerate(self.eval_sets.items()):
            items = [data[i] for i in range(min(cfg.num_prompts, len(data)))]
            if not items:
                continue
            rewards = [group[0] for group in self._eval_rewards(items, greedy)]
            pooled += rewards
            metrics[f"eval/{name}/accuracy"] = sum(r >= threshold for r in rewards) / len(items)
            metrics[f"eval/{name}/reward_mean"] = sum(rewards) / len(items)
            if cfg.num_samples:
                k = cfg.num_samples
                params = self.sampling_params(_EVAL_SEED_OFFSET + index, n=k, max_new_tokens=cfg.max_new_tokens)
                if cfg.temperature is not None:
                    params = dataclasses.replace(params, temperature=cfg.temperature)
                hits = [sum(r >= threshold for r in group) for group in self._eval_rewards(items, params)]
                metrics[f"eval/{name}/avg@{k}"] = sum(hits) / (k * len(items))
                for j in sorted({2 ** p for p in range(k.bit_length()) if 2 ** p <= k} | {k}):
                    metrics[f"eval/{name}/pass@{j}"] = sum(pass_at_k(k, c, j) for c in hits) / len(items)
        if pooled:
            metrics["eval/accuracy"] = sum(r >= threshold for r in pooled) / len(pooled)
            metrics["eval/reward_mean"] = sum(pooled) / len(pooled)
        return metrics

    def _eval_rewards(self, items: list[dict], params: SamplingParams) -> list[list[float]]:
        """Rewards of params.n responses to every eval item, one list per item."""
        outs = self.engine.generate([it["prompt_ids"] for it in items], params)
        responses = [o.response_ids for group in outs for o in group]
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        prompts = self.tokenizer.batch_decode([it["prompt_ids"] for it in items], skip_special_tokens=True)
        n = params.n
        rewards = self.rewards.score([p for p in prompts for _ in range(n)], texts,
                                     [it["answer"] for it in items for _ in range(n)],
                                     [it["meta"] for it in items for _ in range(n)])
        return [rewards[i * n:(i + 1) * n] for i in range(len(items))]

    # ------------------------------------------------------------------------------------ main loop
    def train_step(self) -> dict:
        timer = PhaseTimer()
        start = time.perf_counter()
        with timer.phase("generation"):
            self.memory.before_generation()
            if _rank0():
                batch, rollout_metrics = self.worker.next_batch(self.step) if self._background() else self.rollout()
                if not self._background():
                    release_rollout_memory(self.engine)  # colocated GPU servers: memory back until the sync
                self.prompt_log.log(self.step + 1, batch)
            else:
                batch, rollout_metrics = None, None
            routes = self._take_engine_routes(batch) if _rank0() and self.routing else None
            # the routes go separately, each rank its own share (replay/delivery.py)
            batch, rollout_metrics, header = _broadcast((batch, rollout_metrics, route_header(routes)))
            self.memory.after_generation()
        train_metrics = self.train_on(batch, timer, routes if _rank0() else header)
        self.step += 1
        self.memory.before_weight_sync()
        with timer.phase("weight_sync"):
            background = _rank0() and self._background()
            with self.worker.weight_update(self.step) if background else nullcontext():
                self.sync_weights(verify=not background)
            if background:  # the probe once the rollout side has the engine back: it need not wait for it
                self.engine.verify_push()
        elapsed = time.perf_counter() - start
        sync_metrics = self.engine.sync_metrics() if _rank0() else {}
        metrics = {**rollout_metrics, **train_metrics, **sync_metrics, **self.memory.take_metrics(), **timer.times,
                   "time/step": elapsed,
                   "throughput/tokens_per_s": rollout_metrics["rollout/tokens"] / elapsed}
        return metrics

    def _background(self) -> bool:
        return self.cfg.rollout.mode != "sync"

    def _stop_requested(self) -> bool:
        """True on every rank once any rank got SIGUSR1/SIGTERM (Slurm's warning before the time limit)."""
        flag = torch.tensor([float(stop_signal_received())])  # a CPU value: reduced over the gloo control group
        if multi_rank():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=control_group())
        return bool(flag.item())

    def train(self) -> list[dict]:
        from tqdm import tqdm

        cfg = self.cfg
        history = []
        self.preempted = False
        if self.step == 0:
            self.sft_warmup()
            initial = self.evaluate()
            if _rank0() and initial:
                self.metrics.log(0, initial)
        bar = tqdm(total=cfg.train.steps, initial=self.step, disable=not (_rank0() and cfg.logging.progress_bar),
                   desc="RL steps", dynamic_ncols=True)
        while self.step < cfg.train.steps:
            metrics = self.train_step()
            if cfg.eval.interval and self.step % cfg.eval.interval == 0 and self.step < cfg.train.steps:
                metrics.update(self.evaluate())
            if self.step == cfg.train.steps:
                metrics.update(self.evaluate())
            if _rank0():
                self.metrics.log(self.step, metrics)
                bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", acc=f"{metrics['reward/accuracy']:.2f}")
                bar.update(1)
            history.append(metrics)
            if not all(math.isfinite(v) for v in metrics.values() if isinstance(v, float)):
                logger.warning("step %d produced non-finite metrics", self.step)
            interval = cfg.checkpoint.save_interval
            if self._stop_requested():
                path = self.save_checkpoint()
                self.preempted = True
                if _rank0():
                    logger.warning("PREEMPTED: checkpoint saved at %s; rerun with --resume to continue", path)
                break
            if (interval and self.step % interval == 0) or self.step == cfg.train.steps:
                self.save_checkpoint()
        bar.close()
        return history

    def sft_warmup(self) -> None:
        """Optional supervised warm start on (prompt, answer) pairs, so that rewards start mixed."""
        from grpo_megatron.training.sft import sft_warmup

        if self.cfg.train.sft_warmup_steps > 0:
            sft_warmup(self)
            self.sync_weights()

    def close(self) -> None:
        if _rank0():
            self.worker.close()
            self.metrics.close()
            self.engine.shutdown()
