"""The trainer side of one RL step under CUDA's rules (harness.py), at simulated layouts; run as a script.

`python -m tests.gpu_semantics.scenarios` prints one JSON object: {"<layout>/<check>": "ok" or the error}.
It runs in its own interpreter because the CPU shims that the rest of the suite applies would hide every
device mismatch. Each layout runs as one rank of a fake world: the last rank, so that under PP2 it is the
stage that computes log-probs and losses.

The interpreter runs with the fake-CUDA shim preloaded (`grpo_megatron.simulation.shim`), so autograd,
megatron's DistributedDataParallel (distributed optimizer, overlapped grad reduce) and its optimizer run: every
loss check is a forward AND backward through megatron's schedule, and `optimizer_step` a whole train step.
MoE layers dispatch with the balanced-routing stand-in (`simulation/moe.py`: dropless dispatch sizes its
buffers from routing values, which fake tensors lack); pipeline stages exchange fixed shapes
(`variable_seq_lengths=False`, equal-length samples under PP: the shape a stage sends as a tensor value
arrives as a placeholder).

What fake mode cannot follow, so these checks leave to the CPU tests:
* values: fake tensors have none; `.item()` answers 1 (harness), so metrics and flags are placeholders;
* object collectives move no data (harness: payloads are checked for CUDA tensors, then echoed; where a
  check needs other ranks' objects, `peer_objects` answers them from megatron's rank layout).
"""
from __future__ import annotations

import json
import sys
import time
import traceback
from dataclasses import replace

import torch

from tests.gpu_semantics import harness

LAYOUTS = {  # name: (world size, HF family, ParallelLayout kwargs)
    "tp2": (2, "qwen3", dict(tensor_parallel=2)),
    "pp2": (2, "qwen3", dict(pipeline_parallel=2)),
    "dp2": (2, "qwen3", {}),
    "ep2": (2, "qwen3_moe", dict(expert_parallel=2)),
}
LOSSES = ("grpo", "gspo", "gspo_token")


def _samples(n: int = 8, equal_lengths: bool = False):
    """A step's samples as the trainer holds them (CPU tensors), with every per-token field the losses read."""
    from grpo_megatron.samples import Sample, TrainerFields

    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(n):
        prompt = torch.randint(1, 60, (4 if equal_lengths else 3 + i % 3,), generator=g).tolist()
        response = torch.randint(1, 60, (4 if equal_lengths else 2 + i % 4,), generator=g).tolist()
        r = len(response)
        samples.append(Sample(prompt_ids=prompt, response_ids=response, group=i // 4, engine_logprobs=[-1.0] * r,
                              trainer=TrainerFields(advantage=0.5 - i % 2, old_logprobs=torch.full((r,), -1.0),
                                                    ref_logprobs=torch.full((r,), -1.1))))
    return samples


def _learner(cfg):
    """A Learner with only what its log-prob pass and route delivery read (no policy, engine or model loading)."""
    from types import SimpleNamespace

    from grpo_megatron.training.builder import learner_spec
    from grpo_megatron.training.learner import Learner

    return Learner(learner_spec(cfg), policy=None, actor=None, memory=None, tokenizer=SimpleNamespace(pad_token_id=0),
                   train_data=None)


def _on_cuda(tensors) -> None:
    where = {t.device.type for t in tensors}
    assert where == {"cuda"}, f"tensors on {where}, expected cuda"


def run_layout(name: str) -> dict[str, str]:
    from grpo_megatron.config import RunConfig, replace_keys
    from grpo_megatron.models import build_model, model_dims
    from grpo_megatron.models.tiny import tiny_hf_config
    from grpo_megatron.parallel import ParallelLayout, init_model_parallel
    from grpo_megatron.simulation import moe
    from grpo_megatron.training import actor
    from grpo_megatron.training.loop import stop_requested
    from grpo_megatron.training.metrics import PhaseTimer

    world, family, kwargs = LAYOUTS[name]
    results: dict[str, str] = {}

    def check(what, fn):
        try:
            fn()
            results[f"{name}/{what}"] = "ok"
        except BaseException as e:  # noqa: BLE001 - reported per check
            traceback.print_exc()
            results[f"{name}/{what}"] = f"{type(e).__name__}: {e}"[:2000] + "\n" + traceback.format_exc()[-3000:]

    hf = tiny_hf_config(family)
    layout = ParallelLayout(**kwargs)
    moe_model = family == "qwen3_moe"
    pipelined = layout.pipeline_parallel > 1
    if moe_model:
        moe.use_balanced_dispatch(1.0)
    # DDP as the trainer builds it on GPUs (distributed optimizer, overlapped grad reduce and param gather)
    ddp = dict(use_distributed_optimizer=True, overlap_grad_reduce=True, overlap_param_gather=True)
    with harness.fake_gpu_rank(world - 1, world, require_shim=True):
        init_model_parallel(layout, seed=0, **model_dims(hf))
        cfg = replace_keys(RunConfig(parallel=layout), {"train.micro_batch_size": 4, "algorithm.kl_coef": 0.1})
        learner = _learner(cfg)
        samples = _samples(equal_lengths=pipelined)
        state = {}

        def build():
            state["model"] = build_model(hf, layout, torch.bfloat16, wrap_ddp=True, ddp_overrides=ddp,
                                         moe_enable_routing_replay=moe_model, variable_seq_lengths=not pipelined)
            _on_cuda(p for c in state["model"].chunks for p in c.parameters())
            state["actor"] = actor.Actor(state["model"], cfg.train, total_steps=1)

        def logprobs():
            with torch.no_grad():
                state["logprobs"] = learner.logprobs(state["model"], samples)

        def loss(variant):
            def run():
                variant_learner = _learner(replace_keys(cfg, {"algorithm.loss": variant}))
                state["outputs"] = _train_pass(state["model"], variant_learner, samples)
            return run

        def metrics():
            actor.reduce_metrics(state["outputs"])

        def phase_timer():
            before = harness.SYNCS["count"]
            with PhaseTimer().phase("x"):
                pass
            assert harness.SYNCS["count"] == before + 2, "PhaseTimer did not synchronise CUDA at its boundaries"

        def optimizer_step():
            micro = learner.micro_batches(samples, list(range(len(samples))))
            state["actor"].train_step(micro, _loss_fn(learner, samples), 1.0)

        check("build", build)
        check("logprob_gather", logprobs)
        for variant in LOSSES:
            check(f"loss_{variant}", loss(variant))
        check("metric_reduction", metrics)
        check("optimizer_step", optimizer_step)
        check("stop_flag", stop_requested)
        check("phase_timer", phase_timer)
        if moe_model:
            check("route_delivery", lambda: _engine_routes(state["model"], learner, samples, "r3"))
            check("routing_replay_r3", lambda: _replay(state["model"], learner, samples, "r3"))
            check("routing_replay_r2", lambda: _replay(state["model"], learner, samples, "r2"))
    # The weight-sync sender is rank 0, the first stage's leader, which packs and posts the buckets.
    with harness.fake_gpu_rank(0, world, require_shim=True):
        init_model_parallel(layout, seed=0, **model_dims(hf))
        stage_of = _pipeline_stage_of_rank(world, layout)
        check("weight_sync_buckets", lambda: _weight_sync_buckets(
            build_model(hf, layout, torch.bfloat16, moe_enable_routing_replay=moe_model), stage_of))
    return results


def _pipeline_stage_of_rank(world: int, layout) -> dict[int, int]:
    """Every rank's pipeline stage, from megatron's own rank generator (its default order tp-cp-ep-dp-pp)."""
    from megatron.core.parallel_state import RankGenerator

    generator = RankGenerator(tp=layout.tensor_parallel, ep=1, dp=layout.data_parallel(world),
                              pp=layout.pipeline_parallel, cp=layout.context_parallel, order="tp-cp-ep-dp-pp")
    return {rank: stage for group in generator.get_ranks("pp") for stage, rank in enumerate(group)}


def _loss_fn(learner, samples):
    """The trainer's loss for a pass over all `samples` (normalised over the whole batch)."""
    from grpo_megatron.algorithms import loss_normalizer
    from grpo_megatron.training.batch import make_micro_batch
    from grpo_megatron.training.update_math import policy_loss_fn

    whole = make_micro_batch(samples, list(range(len(samples))), 0)
    update = learner.spec.update
    normalizer = loss_normalizer(whole.response_mask, update.algorithm.loss_agg, update.max_new_tokens)
    return policy_loss_fn(update.algorithm, update.max_new_tokens, normalizer, first_minibatch=True, distilling=False)


def _train_pass(model, learner, samples) -> list[dict]:
    """A training pass (forward and backward through megatron's schedule, grads into DDP's buffers)."""
    from grpo_megatron.training import actor

    loss_fn = _loss_fn(learner, samples)

    def with_tokens(mb, lp, ent):
        value, metrics = loss_fn(mb, lp, ent)
        metrics["_tokens"] = torch.tensor(float(mb.num_response_tokens))
        return value, metrics

    for chunk in model.chunks:
        chunk.zero_grad_buffer()
    micro = learner.micro_batches(samples, list(range(len(samples))))
    outputs = actor._run_schedule(model, micro, with_tokens, 1.0, forward_only=False)
    grads = [p.main_grad for c in model.chunks for p in c.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads), "parameters without a main_grad after the backward"
    _on_cuda(grads)
    return outputs


def _weight_sync_buckets(model, stage_of: dict[int, int]) -> None:
    """The weight-sync payloads as rank 0 makes them: the whole model streamed as HF buckets for rank 0
    (tensor/distributed/disk modes) and for every rank (colocated servers): the TP/EP gathers and the bucket
    bytes on the device over NCCL-rule groups, bucket metadata as CPU objects over the gloo control group
    (other ranks' pipeline stages answered from megatron's layout; other stages' buckets, which only their
    leaders can pack, arrive as the end-of-stage marker a fake group's receive yields)."""
    from grpo_megatron.models.weight_stream import hf_buckets
    from grpo_megatron.simulation.fake_cuda import peer_objects

    for to_every_rank in (False, True):
        with peer_objects(lambda rank, obj: stage_of[rank] if obj == stage_of[0] else obj):
            buckets = list(hf_buckets(model, 64 * 1024, to_every_rank=to_every_rank))
        assert len(buckets) > 1, "expected the tiny model in several 64 KiB buckets"
        _on_cuda(b.flat for b in buckets)


def _engine_routes(model, learner, samples, mode: str):
    """This rank's share of the engine routes, received as the trainer receives it: rank 0 takes them out of
    the broadcast samples, the other ranks get theirs over the gloo control group (CPU tensors only)."""
    from grpo_megatron.parallel import control_group
    from grpo_megatron.replay import attach_routing_replay
    from grpo_megatron.replay.delivery import deliver_engine_routes, route_header

    config = model.config
    g = torch.Generator().manual_seed(1)
    samples[:] = [replace(s, routed_experts=torch.randint(
        0, config.num_moe_experts, (s.length - 1, config.num_layers, config.moe_router_topk), generator=g,
        dtype=torch.int32)) for s in samples]
    routing = attach_routing_replay(model, mode)
    learner.routing = routing
    header = route_header(learner.take_engine_routes(samples))  # what rank 0 broadcasts with the samples
    assert all(s.routed_experts is None for s in samples), "routes left in the broadcast samples"
    engine = deliver_engine_routes(header, samples, learner.samples_of_this_rank(samples), routing.local_layers,
                                   routing.topk, routing.num_experts, control_group())
    return routing, engine


def _replay(model, learner, samples, mode: str) -> None:
    """R2/R3 bookkeeping over an old-log-prob pass: engine routes in, routes recorded, counts reduced."""
    routing, engine = _engine_routes(model, learner, samples, mode)
    routing.begin_step(samples, engine)
    with torch.no_grad():
        learner.logprobs(model, samples)
    _train_pass(model, learner, samples)  # replays the old (R2) or engine (R3) routes, forward and backward
    # pass_over raised if a layer left replay data unused; end_step's "every sample replayed somewhere" flag is
    # all-reduced over ranks, a value fake mode cannot know: it answers True
    with harness.placeholder_bools(True):
        routing.end_step()


def simulated_rank_spec():
    """A small MoE rank for `grpo_megatron.simulation`'s own checks: rank 1 of 4 at EP2 (DP 4, expert-DP 2)."""
    from grpo_megatron.models.tiny import tiny_hf_config
    from grpo_megatron.parallel import ParallelLayout
    from grpo_megatron.simulation import RankSpec

    return RankSpec(model_config=tiny_hf_config("qwen3_moe").to_dict(), layout=ParallelLayout(expert_parallel=2),
                    rank=1, world_size=4, seq_len=256, micro_batch_size=2, num_micro_batches=2)


def simulate() -> dict[str, str]:
    """`simulate_rank_here` of `simulated_rank_spec`, without and with full recompute (in this interpreter, which
    has the shim), as JSON."""
    from dataclasses import asdict, replace

    from grpo_megatron.simulation.rank import simulate_rank_here

    results = {}
    for key, recompute in (("simulate/rank_memory", "none"), ("simulate/rank_memory_recompute", "full")):
        try:
            results[key] = json.dumps(asdict(simulate_rank_here(replace(simulated_rank_spec(), recompute=recompute))))
        except BaseException as e:  # noqa: BLE001 - reported to the test
            traceback.print_exc()
            results[key] = f"{type(e).__name__}: {e}"
    return results


def main(names: list[str]) -> None:
    results = {}
    from tests.gpu_semantics import offload_cycle

    extra = {"simulate": simulate, "offload": offload_cycle.run}
    for name in names or [*LAYOUTS, *extra]:
        start = time.perf_counter()
        results.update(extra[name]() if name in extra else run_layout(name))
        results[f"{name}/_seconds"] = f"{time.perf_counter() - start:.1f}"
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
