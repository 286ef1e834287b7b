"""megatron-core's per-router replay hook, owned by one policy and driven micro-batch by micro-batch.

megatron's `RouterReplay` is the hook point: every `TopKRouter` built with `moe_enable_routing_replay`
hands its top-k selection to `router.router_replay.get_replay_topk(scores, ...)`, and when replaying,
megatron gathers the scores at the given indices so the gating weights stay differentiable. We keep that
and replace each router's instance by a `LayerReplay`, which

* is not in `RouterReplay`'s class-level list, so a reference model, a rebuilt model or a test model in
  the same process cannot shift which data reaches which layer (we also drop the policy's original
  instances from that list);
* consumes one target per micro-batch from a queue, so replay data cannot be silently reused (megatron's
  REPLAY_FORWARD reuses its last target for every call);
* detects the backward recompute itself: a routing call with autograd disabled during a training pass
  is a checkpointed forward, and that layer's next grad-enabled call is its recompute (REPLAY_BACKWARD);
* computes the live top-k from the scores on every forward, even while replaying, for the agreement
  metrics.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction


class RoutingReplayError(RuntimeError):
    """Replay data that does not fit the pass it was given to; the message names layer and micro-batch."""


@dataclass
class Routes:
    """Expert indices [tokens, topk] for one layer and micro-batch, in megatron's token order, with the
    tokens that carry data (`valid` [tokens] bool; the others keep the live routing)."""

    indices: torch.Tensor
    valid: torch.Tensor


@dataclass
class Target:
    """What one routing call does: replay `replay` (None: live routing) and count top-k set agreement of
    the live routing with `compare` (None: nothing to compare with)."""

    micro_batch: int
    replay: Routes | None
    compare: Routes | None


def moe_layer_numbers(config) -> list[int]:
    """Global (1-based) numbers of the MoE layers, from megatron's `moe_layer_freq`."""
    freq = config.moe_layer_freq
    pattern = [int(i % freq == 0) for i in range(config.num_layers)] if isinstance(freq, int) else list(freq)
    return [i + 1 for i, is_moe in enumerate(pattern) if is_moe]


class LayerReplay(RouterReplay):
    """The replay hook of one MoE layer of the policy (see the module docstring)."""

    def __init__(self, layer_number: int, moe_index: int, num_experts: int):
        super().__init__()
        RouterReplay.global_router_replay_instances.remove(self)
        self.layer_number = layer_number
        self.moe_index = moe_index
        self.num_experts = num_experts
        self.disarm()

    def disarm(self) -> None:
        """Back to plain live routing, with no queued data."""
        self.router_replay_action = None
        self.training_pass = False
        self.targets: list[Target] = []
        self.recompute: deque[Target] = deque()
        self.calls = 0
        self.live: list[torch.Tensor] = []
        self.agree = 0
        self.compared = 0

    def arm(self, targets: list[Target], training_pass: bool) -> None:
        """Queue one target per micro-batch of the coming pass, in schedule order."""
        self.disarm()
        replaying = any(t.replay is not None for t in targets)
        self.router_replay_action = RouterReplayAction.REPLAY_FORWARD if replaying else RouterReplayAction.RECORD
        self.training_pass = training_pass
        self.targets = targets

    def unused(self) -> str | None:
        """Why this layer's queued data was not consumed exactly once, or None."""
        if self.calls < len(self.targets):
            return (f"layer {self.layer_number}: replay data of micro-batches {self.calls}..{len(self.targets) - 1} "
                    f"left unused ({self.calls} of {len(self.targets)} forward calls happened)")
        if self.recompute:
            return (f"layer {self.layer_number}: backward recompute of micro-batch {self.recompute[0].micro_batch} "
                    f"never happened; its replay data is unused")
        return None

    def _next_target(self) -> tuple[Target, bool]:
        if self.training_pass and torch.is_grad_enabled() and self.recompute:
            return self.recompute.popleft(), True
        if self.calls >= len(self.targets):
            raise RoutingReplayError(
                f"layer {self.layer_number}: routing call {self.calls + 1} in a pass of {len(self.targets)} "
                f"micro-batches: replay data of micro-batch {self.calls} does not exist and would be reused")
        target = self.targets[self.calls]
        self.calls += 1
        if self.training_pass and not torch.is_grad_enabled():
            self.recompute.append(target)  # checkpointed forward: the recompute replays the same routes
        return target, False

    def _check(self, routes: Routes, scores: torch.Tensor, topk: int, micro_batch: int) -> None:
        where = f"layer {self.layer_number}, micro-batch {micro_batch}"
        if routes.indices.shape != (scores.shape[0], topk):
            raise RoutingReplayError(
                f"{where}: replay data has shape {tuple(routes.indices.shape)} but the router routes "
                f"{scores.shape[0]} tokens to top-{topk}")
        if routes.indices.numel() and not (0 <= int(routes.indices.min()) and int(routes.indices.max()) < self.num_experts):
            raise RoutingReplayError(
                f"{where}: replay data has expert ids outside [0, {self.num_experts}) "
                f"(min {int(routes.indices.min())}, max {int(routes.indices.max())})")

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
        if self.router_replay_action is None:
            return default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
        target, is_recompute = self._next_target()
        if target.replay is None:
            probs, indices = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
            live = indices.detach()
        else:
            self._check(target.replay, scores, topk, target.micro_batch)
            with torch.no_grad():
                live = default_compute_topk(scores.detach(), topk, num_groups=num_groups, group_topk=group_topk)[1]
            replay = target.replay
            indices = torch.where(replay.valid.to(scores.device)[:, None], replay.indices.to(scores.device), live)
            probs = scores.gather(1, indices)
        if not is_recompute:
            self.live.append(live)
            if target.compare is not None:
                self._check(target.compare, scores, topk, target.micro_batch)
                self._count(live, target.compare)
        return probs, indices

    def _count(self, live: torch.Tensor, compare: Routes) -> None:
        """Tokens whose live top-k *set* equals the compared one (order ignored)."""
        valid = compare.valid.to(live.device)
        same = (live.sort(dim=1).values == compare.indices.to(live.device).sort(dim=1).values).all(dim=1)
        self.agree += int((same & valid).sum())
        self.compared += int(valid.sum())


def install_layer_replays(chunks: list[torch.nn.Module], config) -> list[LayerReplay]:
    """Give every MoE router of `chunks` its own LayerReplay; returns them in layer order."""
    from megatron.core.transformer.moe.router import TopKRouter

    if not config.moe_enable_routing_replay:
        raise RoutingReplayError("the policy was built without moe_enable_routing_replay=True; "
                                 "build it with build_model(..., moe_enable_routing_replay=True)")
    moe_index = {number: i for i, number in enumerate(moe_layer_numbers(config))}
    layers = []
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, TopKRouter):
                if module.router_replay is None:
                    raise RoutingReplayError(f"router of layer {module.layer_number} has no replay hook")
                if module.router_replay in RouterReplay.global_router_replay_instances:
                    RouterReplay.global_router_replay_instances.remove(module.router_replay)
                module.router_replay = LayerReplay(module.layer_number, moe_index[module.layer_number],
                                                   config.num_moe_experts)
                layers.append(module.router_replay)
    if not layers:
        raise RoutingReplayError("routing replay needs an MoE model; this one has no MoE router")
    return sorted(layers, key=lambda layer: layer.layer_number)
