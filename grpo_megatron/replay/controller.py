"""Routing replay for one policy over one RL step: R2, R3, and routing-agreement metrics.

Per step: `begin_step(samples)`; the policy's forward-only pass is the old-policy pass, its other passes
are training passes (`pass_over`, called by the actor around every megatron schedule); `end_step()`
checks that the replay data was used and returns the metrics.

- old pass: live routing is recorded (the "old" routes); under R3 it replays the engine's routes so that
  old log-probs come from the same experts as training. Agreement (a) rollout-vs-train compares its live
  top-k with the engine's routes: same weights as the rollout, so it measures train/inference routing
  mismatch.
- training passes: replay the old routes (R2), the engine's (R3) or nothing (none); agreement (b)
  old-vs-current compares their live top-k with the old routes.
- the reference model has no controller: it routes with its own router (so under R3 its KL to the
  policy is not 0 at the first mini-batch).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist

from grpo_megatron.models.provider import PolicyModel
from grpo_megatron.platform import device
from grpo_megatron.ranks import multi_rank
from grpo_megatron.replay.routers import (
    LayerReplay, RoutingReplayError, Target, install_layer_replays, moe_layer_numbers)
from grpo_megatron.replay.tables import RouteTable
from grpo_megatron.samples import MicroBatch, Sample

MODES = ("none", "r2", "r3")
ROLLOUT_TRAIN = "routing/agree_rollout_train"
OLD_CURRENT = "routing/agree_old_current"


class RoutingReplay:
    def __init__(self, model: PolicyModel, mode: str):
        from megatron.core import parallel_state

        if mode not in MODES:
            raise ValueError(f"routing replay mode {mode!r}: use one of {', '.join(MODES)}")
        if model.layout.context_parallel > 1:
            raise RoutingReplayError("routing replay with context_parallel > 1 is not supported "
                                     "(the trainer does not split sequences over CP ranks)")
        config = model.config
        self.mode = mode
        self.layers: list[LayerReplay] = install_layer_replays(model.chunks, config)
        self.num_moe_layers = len(moe_layer_numbers(config))
        self.topk = config.moe_router_topk
        self.num_experts = config.num_moe_experts
        self.sp_size = parallel_state.get_tensor_model_parallel_world_size() if config.sequence_parallel else 1
        self.sp_rank = parallel_state.get_tensor_model_parallel_rank() if config.sequence_parallel else 0
        self.tp_group = parallel_state.get_tensor_model_parallel_group() if self.sp_size > 1 else None
        self.dp_group = parallel_state.get_data_parallel_group()
        self.samples: list[Sample] | None = None

    @property
    def local_layers(self) -> list[int]:
        return [layer.moe_index for layer in self.layers]

    # ------------------------------------------------------------------------------------ step
    def begin_step(self, samples: list[Sample], engine: RouteTable | None = None) -> None:
        """Start a step over `samples` (the indices micro-batches refer to), with this rank's share of the
        engine's routes (replay/delivery.py); without it, the routes are read from the samples."""
        self.samples = samples
        if engine is None and (self.mode == "r3" or any(s.routed_experts is not None for s in samples)):
            engine = RouteTable.from_engine(samples, self.local_layers, self.num_moe_layers, self.topk,
                                            self.num_experts)
        self.engine: RouteTable | None = engine
        self.old: RouteTable | None = None
        self.replayed = torch.zeros(len(samples))
        self.counts = {name: torch.zeros(self.num_moe_layers, 2, dtype=torch.float64)
                       for name in (ROLLOUT_TRAIN, OLD_CURRENT)}

    def end_step(self) -> dict[str, float]:
        """Check that every sample's routes were replayed; agreement per MoE layer and overall.

        Collective: every rank calls it (counts are summed over all ranks)."""
        if self.samples is None:
            raise RoutingReplayError("end_step() without begin_step()")
        replayed, counts = self.replayed, torch.stack([self.counts[ROLLOUT_TRAIN], self.counts[OLD_CURRENT]])
        self.samples = None
        if multi_rank():
            # the default group is NCCL on GPU: its collectives take device tensors only
            replayed, counts = replayed.to(device()), counts.to(device())
            dist.all_reduce(replayed, op=dist.ReduceOp.MAX)
            dist.all_reduce(counts)
            replayed, counts = replayed.cpu(), counts.cpu()
        if self.mode != "none" and not bool(replayed.all()):
            missing = (replayed == 0).nonzero().flatten().tolist()
            raise RoutingReplayError(f"{self.mode}: routes of samples {missing[:10]} were never replayed in a "
                                     f"training pass this step (replay data left unused)")
        metrics = {}
        for name, per_layer in zip((ROLLOUT_TRAIN, OLD_CURRENT), counts):
            agree, total = per_layer[:, 0], per_layer[:, 1]
            if total.sum() == 0:
                continue
            metrics[name] = float(agree.sum() / total.sum())
            for index in range(self.num_moe_layers):
                if total[index] > 0:
                    metrics[f"{name}/layer_{index}"] = float(agree[index] / total[index])
        return metrics

    # ------------------------------------------------------------------------------------ passes
    @contextmanager
    def pass_over(self, micro_batches: list[MicroBatch], forward_only: bool):
        """Arm the routers for one megatron schedule over `micro_batches` (outside a step: live routing)."""
        if self.samples is None:
            yield
            return
        old_pass = forward_only
        if old_pass and self.old is not None:
            raise RoutingReplayError("a second forward-only pass of the policy in one step: the old-policy "
                                     "routes are recorded once per step")
        if self.mode == "r2" and not old_pass and self.old is None:
            raise RoutingReplayError("r2 replays the routes of the old-log-prob pass, which did not run this step "
                                     "(rollout.use_engine_logprobs must be false)")
        replay = self.engine if self.mode == "r3" else (self.old if self.mode == "r2" and not old_pass else None)
        compare = self.engine if old_pass else self.old
        metric = ROLLOUT_TRAIN if old_pass else OLD_CURRENT
        aligned = {name: [t.align(mb, self.sp_rank, self.sp_size) if t is not None else None for mb in micro_batches]
                   for name, t in (("replay", replay), ("compare", compare))}
        for j, layer in enumerate(self.layers):
            layer.arm([Target(m, _column(aligned["replay"][m], j), _column(aligned["compare"][m], j))
                       for m in range(len(micro_batches))], training_pass=not old_pass)
        try:
            yield
            problems = [p for p in (layer.unused() for layer in self.layers) if p]
            if problems:
                raise RoutingReplayError("; ".join(problems))
            for layer in self.layers:
                self.counts[metric][layer.moe_index] += torch.tensor([layer.agree, layer.compared],
                                                                     dtype=torch.float64)
            if old_pass:
                self.old = RouteTable.from_recorded(
                    micro_batches, self.samples, [layer.live for layer in self.layers], self.local_layers,
                    self.num_experts, self.tp_group, self.dp_group)
            elif replay is not None:
                for mb in micro_batches:
                    self.replayed[mb.indices] = 1.0
        finally:
            for layer in self.layers:
                layer.disarm()


def _column(routes, j):
    return None if routes is None else routes[j]


def attach_routing_replay(model: PolicyModel, mode: str) -> RoutingReplay:
    """Install the replay hooks on `model`'s routers; the actor finds the controller in `model.extra`."""
    controller = RoutingReplay(model, mode)
    model.extra["routing_replay"] = controller
    return controller
