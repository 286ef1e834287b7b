"""Per-sample expert routes, and their alignment to megatron's token order in a micro-batch.

A table holds, for each sample of a step, int routes [positions, layers, topk] for this pipeline stage's
MoE layers; position t is the token at t of prompt + response (the engine reports the first
`length - 1` positions, the trainer's own record all `length`). In a micro-batch ([b, s], right-padded)
megatron's router sees tokens sequence-first ([s, b] flattened, s outer); under sequence parallelism
each tensor-parallel rank sees its contiguous slice of s. Positions without data (padding, the final
token the engine never fed back) keep the live routing: their outputs reach no loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from grpo_megatron.replay.routers import RoutingReplayError, Routes
from grpo_megatron.samples import MicroBatch, Sample
from grpo_megatron.samples import route_storage_dtype as storage_dtype


@dataclass
class RouteTable:
    routes: dict[int, torch.Tensor]  # sample index -> [positions, len(layers), topk]
    layers: list[int]  # MoE indices (0-based, whole model) of the columns

    @classmethod
    def from_engine(cls, samples: list[Sample], layers: list[int], num_moe_layers: int, topk: int,
                    num_experts: int) -> RouteTable:
        """The rollout engine's `routed_experts` of every sample, checked, keeping this stage's layers."""
        routes = {}
        for i, sample in enumerate(samples):
            r = sample.routed_experts
            if r is None:
                raise RoutingReplayError(f"sample {i} has no routed_experts: the rollout engine did not return "
                                         f"them (R3 needs return_routed_experts on every request)")
            r = torch.as_tensor(r)
            expected = (sample.length - 1, num_moe_layers, topk)
            if tuple(r.shape) != expected:
                raise RoutingReplayError(
                    f"sample {i}: routed_experts has shape {tuple(r.shape)}, expected {expected} "
                    f"(prompt+response-1 positions, MoE layers, top-k)")
            if r.numel() and (int(r.min()) < 0 or int(r.max()) >= num_experts):
                layer = int(((r < 0) | (r >= num_experts)).nonzero()[0, 1])
                raise RoutingReplayError(f"sample {i}, MoE layer {layer}: routed_experts has expert ids outside "
                                         f"[0, {num_experts})")
            # compact from the decode on (uint8/int16): no int32 or int64 copy of a whole sample's routes
            kept = r if list(layers) == list(range(num_moe_layers)) else r[:, layers]
            routes[i] = kept.to(storage_dtype(num_experts))
        return cls(routes, list(layers))

    @classmethod
    def from_recorded(cls, micro_batches: list[MicroBatch], samples: list[Sample],
                      recorded: list[list[torch.Tensor]], layers: list[int], num_experts: int,
                      tp_group, dp_group) -> RouteTable:
        """The live routes a pass recorded (`recorded[layer][micro_batch]`: this rank's [tokens, topk]),
        gathered over the sequence-parallel ranks and the data-parallel ranks of this stage."""
        dtype = storage_dtype(num_experts)
        routes = {}
        for m, mb in enumerate(micro_batches):
            b, s = mb.tokens.shape
            # each layer's [tokens, topk] int64 in the storage dtype first: no int64 [b, s, layers, topk] stack
            per_layer = [_gather_sequence(recorded[j][m].to(dtype), tp_group).view(s, b, -1) for j in range(len(layers))]
            full = torch.stack(per_layer, dim=2).transpose(0, 1)  # [b, s, layers, topk]
            for row, i in enumerate(mb.indices):
                routes[i] = full[row, : samples[i].length].to(dtype).cpu().clone()
        if dp_group is not None and dist.get_world_size(dp_group) > 1:
            parts: list = [None] * dist.get_world_size(dp_group)
            dist.all_gather_object(parts, routes, group=dp_group)
            routes = {k: v for part in parts for k, v in part.items()}
        return cls(routes, list(layers))

    def align(self, mb: MicroBatch, sp_rank: int, sp_size: int) -> list[Routes]:
        """This rank's Routes of every layer of the table for micro-batch `mb` (see the module docstring)."""
        b, s = mb.tokens.shape
        if s % sp_size:
            raise RoutingReplayError(f"micro-batch width {s} is not a multiple of the sequence-parallel size {sp_size}")
        first = next(iter(self.routes.values()))
        topk = first.shape[-1]
        full = torch.zeros(b, s, len(self.layers), topk, dtype=first.dtype)  # compact, as stored (not int64)
        valid = torch.zeros(b, s, dtype=torch.bool)
        for row, i in enumerate(mb.indices):
            if i not in self.routes:
                raise RoutingReplayError(f"no routes for sample {i} of micro-batch {mb.indices}")
            r = self.routes[i]
            if r.shape[0] > s:
                raise RoutingReplayError(f"sample {i} has routes for {r.shape[0]} positions but its micro-batch "
                                         f"is {s} wide")
            full[row, : r.shape[0]] = r
            valid[row, : r.shape[0]] = True
        shard = slice(sp_rank * s // sp_size, (sp_rank + 1) * s // sp_size)
        full = full.transpose(0, 1)[shard]  # [s_local, b, layers, topk]
        valid = valid.transpose(0, 1)[shard].reshape(-1)
        return [Routes(full[:, :, j].reshape(-1, topk), valid) for j in range(len(self.layers))]


def _gather_sequence(local: torch.Tensor, tp_group) -> torch.Tensor:
    """[s_local * b, k] of each sequence-parallel rank -> [s * b, k] (ranks hold consecutive s slices)."""
    if tp_group is None:
        return local
    out = local.new_empty((local.shape[0] * dist.get_world_size(tp_group), *local.shape[1:]))
    dist.all_gather_into_tensor(out, local.contiguous(), group=tp_group)
    return out
