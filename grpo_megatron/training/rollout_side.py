"""The rollout side of the loop, one object per rank: on rank 0 `RolloutSide` owns the engine, the rollout
worker, the rewards and the eval sets and broadcasts each step's batch; on the other ranks `RolloutReceiver`
takes that broadcast through the same calls. Every rank takes part in a weight push (its export collectives)."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace

import torch
import torch.distributed as dist

from grpo_megatron.algorithms import overlong_reward_penalty
from grpo_megatron.models.provider import PolicyModel
from grpo_megatron.parallel import control_group
from grpo_megatron.ranks import multi_rank
from grpo_megatron.replay.delivery import route_header
from grpo_megatron.rollout.engines.base import RolloutEngine, SamplingParams
from grpo_megatron.rollout.data.prompts import PromptItem, PromptLoader
from grpo_megatron.rollout.functions import RolloutContext, generate_samples
from grpo_megatron.samples import Sample
from grpo_megatron.training.evaluation import Evaluator
from grpo_megatron.rollout.rewards.runner import RewardRunner
from grpo_megatron.training.rollout_worker import RolloutSpec, RolloutWorker
from grpo_megatron.training.weight_push import WeightPush, release_rollout_memory


def broadcast_from_rank0(obj):
    """Rank 0's `obj` on every rank, through the control group: gloo with a timeout long enough for the
    other ranks to wait out a rollout (an NCCL wait that long trips its watchdog)."""
    if not multi_rank():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=control_group())
    return box[0]


class RolloutReceiver:
    """A rank other than 0: it gets rank 0's batches and joins the weight pushes; it generates nothing."""

    def __init__(self, spec: RolloutSpec):
        self.spec = spec
        self.weight_push = WeightPush(spec.rollout, spec.hf_path, None)

    def next_batch(self, step: int, take_routes) -> tuple[list[Sample], dict, object]:
        """Step `step`'s samples, rollout metrics and engine-routes header, as rank 0 broadcast them."""
        return broadcast_from_rank0(None)

    def push(self, policy: PolicyModel, version: int) -> None:
        """This rank's part of a weight push outside the step (start, resume, after the warm start)."""
        self.weight_push.run(policy, version=version)

    def push_after_step(self, policy: PolicyModel, version: int) -> None:
        self.weight_push.run(policy, version=version, verify=True)

    def sync_metrics(self) -> dict:
        return {}

    def evaluate(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        """Only rank 0's rollout state goes into a checkpoint."""
        return {"loader": None}

    def load_state_dict(self, state: dict, version: int) -> None:
        """Nothing to restore: the batches come from rank 0."""

    def close(self) -> None:
        """Nothing to stop."""


class RolloutSide(RolloutReceiver):
    """Rank 0: prompts -> engine (G samples each) -> rewards, inline (rollout.mode sync) or on the worker's
    thread, then broadcast to every rank; the weight push, evaluation and the rollout checkpoint state."""

    def __init__(self, spec: RolloutSpec, engine: RolloutEngine, tokenizer, loader: PromptLoader,
                 rewards: RewardRunner, eval_sets: dict):
        self.spec, self.engine, self.tokenizer, self.rewards = spec, engine, tokenizer, rewards
        self.weight_push = WeightPush(spec.rollout, spec.hf_path, engine)
        self.worker = RolloutWorker(spec, loader, self.generate_groups, self.score, self.sampling_params,
                                    rewards.end_step, lambda: engine.weight_version)
        self.evaluator = Evaluator(spec.eval, spec.reward.correct_threshold, engine, tokenizer, rewards, eval_sets,
                                   self.sampling_params)
        self.background = spec.rollout.mode != "sync"

    # ------------------------------------------------------------------------------------ rollouts
    def sampling_params(self, seed_offset: int, greedy: bool = False, n: int | None = None,
                        max_new_tokens: int | None = None) -> SamplingParams:
        """Sampling settings with a seed fixed by (run seed, offset): a resumed run draws the same samples."""
        r = self.spec.rollout
        return SamplingParams(
            max_new_tokens=max_new_tokens or r.max_new_tokens, temperature=0.0 if greedy else r.temperature,
            top_p=r.top_p, top_k=r.top_k, stop_token_ids=list(r.stop_token_ids),
            n=n or r.group_size, seed=self.spec.seed * 1_000_003 + seed_offset)

    def generate_groups(self, items: list[PromptItem], params: SamplingParams, first_group: int) -> list[Sample]:
        """Prompt items -> samples through `rollout.function` (single turn, the tool loop or a user's)."""
        context = RolloutContext(self.tokenizer, self.spec.rollout, self.spec.engine_routes,
                                 self.spec.rollout.function_options)
        return generate_samples(self.engine, items, params, context, first_group)

    def score(self, samples: list[Sample]) -> tuple[list[Sample], int, int]:
        """The samples with their rewards (new Samples: the record is fixed from here), and the failed and
        total reward calls."""
        texts = self.tokenizer.batch_decode([s.response_ids for s in samples], skip_special_tokens=True)
        prompts = self.tokenizer.batch_decode([s.prompt_ids for s in samples], skip_special_tokens=True)
        rewards = self.rewards.score(prompts, texts, [s.answer for s in samples], [s.meta for s in samples])
        if self.spec.reward.overlong_penalty:
            lengths = torch.tensor([len(s.response_ids) for s in samples], dtype=torch.float32)
            penalty = overlong_reward_penalty(lengths, self.spec.rollout.max_new_tokens,
                                              self.spec.reward.overlong_cache_tokens)
            rewards = [r + float(p) for r, p in zip(rewards, penalty)]
        scored = [replace(sample, reward=reward) for sample, reward in zip(samples, rewards)]
        return scored, self.rewards.last_failed, self.rewards.last_calls

    def rollout_now(self, step: int) -> tuple[list[Sample], dict]:
        """Step `step`'s batch and rollout metrics, generated now (rollout.mode sync), without the broadcast."""
        return self.worker.rollout_now(step)

    def next_batch(self, step: int, take_routes) -> tuple[list[Sample], dict, object]:
        """Step `step`'s batch (generated now in sync mode, else taken from the worker's buffer), broadcast; `take_routes` takes the engine's routes off it first (each rank gets its own share later),
        and rank 0 keeps them whole where the other ranks get their header."""
        if self.background:
            batch, metrics = self.worker.next_batch(step)
        else:
            batch, metrics = self.rollout_now(step)
            release_rollout_memory(self.engine)  # colocated GPU servers: memory back until the sync
        routes = take_routes(batch)
        broadcast_from_rank0((batch, metrics, route_header(routes)))
        return batch, metrics, routes

    # ------------------------------------------------------------------------------------ weights, eval
    def push(self, policy: PolicyModel, version: int) -> None:
        self.weight_push.run(policy, version=version)

    def push_after_step(self, policy: PolicyModel, version: int) -> None:
        """The step's push. In the background modes it waits for the worker's gate, and the engine's probe runs
        once the worker has the engine back: the probe need not hold up generation."""
        with self.worker.weight_update(version) if self.background else nullcontext():
            self.weight_push.run(policy, version=version, verify=not self.background)
        if self.background:
            self.engine.verify_push()

    def sync_metrics(self) -> dict:
        return self.engine.sync_metrics()

    def evaluate(self) -> dict:
        """Held-out evaluation (the engine has the current weights), each eval file on its own."""
        if not self.evaluator.eval_sets:
            return {}
        with self.worker.engine_access() if self.background else nullcontext():
            return self.evaluator()

    # ------------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        """Buffer, draws to re-issue and the loader cursor, at one moment."""
        return self.worker.state_dict()

    def load_state_dict(self, state: dict, version: int) -> None:
        self.worker.load_state_dict(state, version=version)

    def close(self) -> None:
        self.worker.close()
        self.engine.shutdown()
