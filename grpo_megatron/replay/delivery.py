"""The rollout engine's routes (R3, and the rollout-vs-train agreement), from rank 0 to the ranks that use them.

Rank 0 holds every sample's routes, [positions, MoE layers, top-k] for the whole model: for a 30B-class
MoE step that is about a gigabyte even at a byte per expert id. A rank needs only the samples its
data-parallel share scores and trains on, and only the MoE layers of its pipeline stage, so rank 0 sends
each rank exactly that slice, as one flat tensor over the gloo control group (point to point), instead of
pickling every route to every rank with the step's samples.

Rank 0 checks the routes (shapes, expert ids) before anything is sent; a problem is raised on every rank
with the same message, so no rank is left waiting for a tensor that never comes.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from grpo_megatron.replay.routers import RoutingReplayError
from grpo_megatron.replay.tables import RouteTable, storage_dtype
from grpo_megatron.samples import Sample


@dataclass
class EngineRoutes:
    """Rank 0's side of a step's routes: the full table (None when the engine returned none), or the
    reason they cannot be used."""

    table: RouteTable | None
    problem: str | None = None


def take_engine_routes(samples: list[Sample], num_moe_layers: int, topk: int, num_experts: int,
                       required: bool) -> EngineRoutes:
    """Move the routes out of `samples` (they are not broadcast with them) into a checked full table:
    each sample in the list is replaced by one without routes (the same trainer values), which frees them
    once nothing else holds the old sample.

    `required` (R3): every sample must have routes; otherwise any sample with routes asks them of all."""
    table, problem = None, None
    if required or any(s.routed_experts is not None for s in samples):
        try:
            table = RouteTable.from_engine(samples, list(range(num_moe_layers)), num_moe_layers, topk, num_experts)
        except RoutingReplayError as error:
            problem = str(error)
    samples[:] = [replace(sample, routed_experts=None) for sample in samples]
    return EngineRoutes(table, problem)


def deliver_engine_routes(routes: EngineRoutes | None, samples: list[Sample], needed: list[int],
                          layers: list[int], topk: int, num_experts: int, group) -> RouteTable | None:
    """This rank's engine routes: the samples in `needed`, the MoE `layers` of its stage.

    Collective over `group` (the gloo control group; None = the default group): every rank calls it, rank 0
    with `routes` from `take_engine_routes`, the others with the flag/problem it broadcast (see
    `route_header`). Returns None when there are no engine routes this step."""
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    rank = dist.get_rank(group) if dist.is_initialized() else 0
    if routes is None or routes.table is None:
        if routes is not None and routes.problem:
            raise RoutingReplayError(routes.problem)
        return None
    if world == 1:
        return _slice(routes.table, needed, layers)
    wanted: list = [None] * world
    dist.all_gather_object(wanted, (needed, layers), group=group)
    if rank == 0:
        for dst in range(1, world):
            indices, dst_layers = wanted[dst]
            part = _slice(routes.table, indices, dst_layers)
            flat = torch.cat([part.routes[i].reshape(-1) for i in indices]) if indices else \
                torch.empty(0, dtype=storage_dtype(num_experts))
            dist.send(flat.contiguous(), dst=_global(dst, group), group=group)
        return _slice(routes.table, needed, layers)
    sizes = [(samples[i].length - 1) * len(layers) * topk for i in needed]
    flat = torch.empty(sum(sizes), dtype=storage_dtype(num_experts))
    dist.recv(flat, src=_global(0, group), group=group)
    parts = flat.split(sizes) if needed else []
    return RouteTable({i: p.view(samples[i].length - 1, len(layers), topk) for i, p in zip(needed, parts)},
                      list(layers))


def route_header(routes: EngineRoutes | None) -> EngineRoutes | None:
    """What rank 0 broadcasts with the samples: whether there are routes, or why they cannot be used (no tensors)."""
    if routes is None:
        return None
    return EngineRoutes(RouteTable({}, []) if routes.table is not None else None, routes.problem)


def _slice(table: RouteTable, indices: list[int], layers: list[int]) -> RouteTable:
    columns = [table.layers.index(layer) for layer in layers]
    return RouteTable({i: table.routes[i][:, columns].contiguous() for i in indices}, list(layers))


def _global(rank: int, group) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)
