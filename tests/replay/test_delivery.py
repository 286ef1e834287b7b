"""The engine's routes reach each rank as exactly its share (its samples, its stage's MoE layers), over gloo,
from rank 0 only; a problem with them stops every rank with rank 0's message."""
from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from grpo_megatron.parallel import free_port
from grpo_megatron.replay.delivery import deliver_engine_routes, route_header, take_engine_routes
from grpo_megatron.replay.routers import RoutingReplayError
from grpo_megatron.samples import Sample
from grpo_megatron.training.batch import samples_of_rank, split_for_rank

LAYERS, TOPK, EXPERTS = 4, 2, 8
# rank -> (samples it scores, MoE layers of its stage): ranks 0/1 = stage 0 (layers 0-1), rank 2 = stage 1
NEEDS = {0: ([0, 2, 4], [0, 1]), 1: ([1, 3], [0, 1]), 2: ([0, 1, 2, 3, 4], [2, 3])}


def _samples(with_routes: bool) -> list[Sample]:
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(5):
        s = Sample(prompt_ids=[1] * (2 + i), response_ids=[2] * (1 + i % 3), group=0)
        if with_routes:
            s = replace(s, routed_experts=torch.randint(0, EXPERTS, (s.length - 1, LAYERS, TOPK), generator=g,
                                                        dtype=torch.int32))
        out.append(s)
    return out


def _deliver(rank: int, bad: bool) -> dict:
    samples = _samples(with_routes=rank == 0)
    if rank == 0 and bad:
        samples[3].routed_experts[0, 1, 0] = EXPERTS  # an expert id out of range
    routes = take_engine_routes(samples, LAYERS, TOPK, EXPERTS, required=True) if rank == 0 else None
    box = [route_header(routes)]
    dist.broadcast_object_list(box, src=0)  # what the trainer broadcasts with the samples
    assert box[0].table is None or not box[0].table.routes, "route tensors went out with the broadcast"
    needed, layers = NEEDS[rank]
    try:
        table = deliver_engine_routes(routes if rank == 0 else box[0], samples, needed, layers, TOPK, EXPERTS, None)
    except RoutingReplayError as error:
        return {"error": str(error)}
    return {"layers": table.layers, "routes": {i: r.clone() for i, r in table.routes.items()},
            "dtype": str(next(iter(table.routes.values())).dtype)}


def _worker(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for bad in (False, True):
            out[(rank, bad)] = _deliver(rank, bad)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def delivered() -> dict:
    """Three gloo processes: a good step's routes, then a step whose routes rank 0 finds bad."""
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(3, free_port(), out), nprocs=3, join=True)
    return dict(out)


def test_each_rank_gets_its_samples_and_layers_only(delivered):
    full = _samples(with_routes=True)
    for rank, (needed, layers) in NEEDS.items():
        got = delivered[(rank, False)]
        assert got["layers"] == layers
        assert sorted(got["routes"]) == needed
        assert got["dtype"] == "torch.uint8"  # a byte per expert id
        for i in needed:
            assert torch.equal(got["routes"][i].long(), full[i].routed_experts[:, layers].long()), (rank, i)


def test_bad_routes_stop_every_rank_with_rank0s_message(delivered):
    messages = {rank: delivered[(rank, True)].get("error") for rank in NEEDS}
    assert messages[0] and "sample 3" in messages[0] and "outside" in messages[0]
    assert set(messages.values()) == {messages[0]}


def test_r3_without_engine_routes_names_the_server_flag():
    routes = take_engine_routes(_samples(with_routes=False), LAYERS, TOPK, EXPERTS, required=True)
    with pytest.raises(RoutingReplayError, match="return_routed_experts"):
        deliver_engine_routes(route_header(routes), [], [], [0], TOPK, EXPERTS, None)
    assert take_engine_routes(_samples(with_routes=False), LAYERS, TOPK, EXPERTS, required=False).table is None


def test_a_rank_needs_the_samples_of_every_pass_it_runs():
    samples = [Sample(prompt_ids=[1] * (1 + (7 * i) % 5), response_ids=[2] * (1 + i % 4), group=i // 4)
               for i in range(12)]
    passes = [list(range(12)), list(range(6)), list(range(6, 12))]
    for rank in range(2):
        runs = [set(split_for_rank(indices, samples, rank, 2)) for indices in passes]
        assert samples_of_rank(samples, passes, rank, 2) == sorted(set.union(*runs))
    # the whole-batch pass and the mini-batch passes deal samples differently: a rank needs more than a half
    assert len(samples_of_rank(samples, passes, 0, 2)) > 6
