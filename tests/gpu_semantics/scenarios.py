"""The trainer side of one RL step under CUDA's rules (harness.py), at simulated layouts; run as a script.

`python -m tests.gpu_semantics.scenarios` prints one JSON object: {"<layout>/<check>": "ok" or the error}.
It runs in its own interpreter because the CPU shims that the rest of the suite applies would hide every
device mismatch. Each layout runs as one rank of a fake world: the last rank, so that under PP2 it is the
stage that computes log-probs and losses.

What fake mode cannot follow, so these checks leave to the CPU tests:
* values: fake tensors have none; `.item()` answers 1 (harness), so metrics and flags are placeholders;
* autograd: recording a backward node for a CUDA tensor asks the CUDA device guard for a stream, which a
  CPU build lacks (the process aborts), so losses run forward-only (no backward, no gradients), and
  megatron's DistributedDataParallel (its set-up takes each parameter's grad accumulator) and optimizer
  cannot be built;
* object collectives move no data (harness: payloads are checked for CUDA tensors, then echoed).
"""
from __future__ import annotations

import json
import sys
import time
import traceback

import torch

from tests.gpu_semantics import harness

LAYOUTS = {  # name: (world size, HF family, ParallelLayout kwargs)
    "tp2": (2, "qwen3", dict(tensor_parallel=2)),
    "pp2": (2, "qwen3", dict(pipeline_parallel=2)),
    "dp2": (2, "qwen3", {}),
    "ep2": (2, "qwen3_moe", dict(expert_parallel=2)),
}
LOSSES = ("grpo", "gspo", "gspo_token")


def _samples(n: int = 8):
    """A step's samples as the trainer holds them (CPU tensors), with every per-token field the losses read."""
    from grpo_megatron.samples import Sample

    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(n):
        prompt = torch.randint(1, 60, (3 + i % 3,), generator=g).tolist()
        response = torch.randint(1, 60, (2 + i % 4,), generator=g).tolist()
        r = len(response)
        samples.append(Sample(prompt_ids=prompt, response_ids=response, group=i // 4, advantage=0.5 - i % 2,
                              engine_logprobs=[-1.0] * r, old_logprobs=torch.full((r,), -1.0),
                              ref_logprobs=torch.full((r,), -1.1)))
    return samples


def _trainer(cfg, layout):
    """A Trainer with only what its log-prob pass, loss and stop flag read (no engine, no model loading)."""
    from grpo_megatron.training.loop import Trainer

    trainer = object.__new__(Trainer)
    trainer.cfg, trainer.pad_id, trainer.tp_size, trainer._signal_received = cfg, 0, layout.tensor_parallel, False
    return trainer


def _on_cuda(tensors) -> None:
    where = {t.device.type for t in tensors}
    assert where == {"cuda"}, f"tensors on {where}, expected cuda"


def run_layout(name: str) -> dict[str, str]:
    from grpo_megatron.config import RunConfig
    from grpo_megatron.models import build_model, model_dims
    from grpo_megatron.models.tiny import tiny_hf_config
    from grpo_megatron.parallel import ParallelLayout, init_model_parallel
    from grpo_megatron.platform import setup_platform
    from grpo_megatron.training import actor
    from grpo_megatron.training.metrics import PhaseTimer

    world, family, kwargs = LAYOUTS[name]
    results: dict[str, str] = {}

    def check(what, fn):
        try:
            fn()
            results[f"{name}/{what}"] = "ok"
        except BaseException as e:  # noqa: BLE001 - reported per check
            results[f"{name}/{what}"] = f"{type(e).__name__}: {e}"[:2000] + "\n" + traceback.format_exc()[-3000:]

    with harness.fake_gpu_rank(world - 1, world):
        setup_platform()
        hf = tiny_hf_config(family)
        layout = ParallelLayout(**kwargs)
        init_model_parallel(layout, seed=0, **model_dims(hf))
        moe = family == "qwen3_moe"
        cfg = RunConfig()
        cfg.parallel, cfg.train.micro_batch_size, cfg.algorithm.kl_coef = layout, 4, 0.1
        trainer = _trainer(cfg, layout)
        samples = _samples()
        state = {}

        def build():
            state["model"] = build_model(hf, layout, torch.bfloat16, moe_enable_routing_replay=moe)
            _on_cuda(p for c in state["model"].chunks for p in c.parameters())

        def logprobs():
            with torch.no_grad():
                state["logprobs"] = trainer._logprob_pass(state["model"], samples)

        def loss(variant):
            def run():
                from grpo_megatron.algorithms import loss_normalizer
                from grpo_megatron.training.batch import make_micro_batch

                cfg.algorithm.loss = variant
                indices = list(range(len(samples)))
                micro = trainer._micro_batches(samples, indices)
                whole = make_micro_batch(samples, indices, 0)
                normalizer = loss_normalizer(whole.response_mask, cfg.algorithm.loss_agg, cfg.rollout.max_new_tokens)
                loss_fn = trainer._loss_fn(normalizer, first_minibatch=True)

                def with_tokens(mb, lp, ent):
                    value, metrics = loss_fn(mb, lp, ent)
                    metrics["_tokens"] = torch.tensor(float(mb.num_response_tokens))
                    return value, metrics

                with torch.no_grad():
                    state["outputs"] = actor._run_schedule(state["model"], micro, with_tokens, 1.0, forward_only=True)
            return run

        def metrics():
            actor.reduce_metrics(state["outputs"])

        def phase_timer():
            before = harness.SYNCS["count"]
            with PhaseTimer().phase("x"):
                pass
            assert harness.SYNCS["count"] == before + 2, "PhaseTimer did not synchronise CUDA at its boundaries"

        check("build", build)
        check("logprob_gather", logprobs)
        for variant in LOSSES:
            check(f"loss_{variant}", loss(variant))
        check("metric_reduction", metrics)
        check("stop_flag", lambda: trainer._stop_requested())
        check("phase_timer", phase_timer)
        if moe:
            check("route_delivery", lambda: _engine_routes(state["model"], trainer, samples, "r3"))
            check("routing_replay_r3", lambda: _replay(state["model"], trainer, samples, "r3"))
            check("routing_replay_r2", lambda: _replay(state["model"], trainer, samples, "r2"))
    # The weight-sync sender is rank 0, the first stage's leader, which packs and posts the buckets.
    with harness.fake_gpu_rank(0, world):
        init_model_parallel(layout, seed=0, **model_dims(hf))
        check("weight_sync_buckets",
              lambda: _weight_sync_buckets(build_model(hf, layout, torch.bfloat16, moe_enable_routing_replay=moe)))
    return results


def _weight_sync_buckets(model) -> None:
    """The weight-sync payloads as rank 0 makes them: the whole model streamed as HF buckets for rank 0
    (tensor/distributed/disk modes) and for every rank (colocated servers): the TP/EP gathers and the bucket
    bytes on the device over NCCL-rule groups, bucket metadata as CPU objects over the gloo control group."""
    from grpo_megatron.models.weight_stream import hf_buckets

    for to_every_rank in (False, True):
        buckets = list(hf_buckets(model, 64 * 1024, to_every_rank=to_every_rank))
        assert len(buckets) > 1, "expected the tiny model in several 64 KiB buckets"
        _on_cuda(b.flat for b in buckets)


def _engine_routes(model, trainer, samples, mode: str):
    """This rank's share of the engine routes, received as the trainer receives it: rank 0 takes them out of
    the broadcast samples, the other ranks get theirs over the gloo control group (CPU tensors only)."""
    from grpo_megatron.parallel import control_group
    from grpo_megatron.replay import attach_routing_replay
    from grpo_megatron.replay.delivery import deliver_engine_routes, route_header

    config = model.config
    g = torch.Generator().manual_seed(1)
    for s in samples:
        s.routed_experts = torch.randint(0, config.num_moe_experts, (s.length - 1, config.num_layers, config.moe_router_topk),
                                         generator=g, dtype=torch.int32)
    routing = attach_routing_replay(model, mode)
    trainer.routing = routing
    header = route_header(trainer._take_engine_routes(samples))  # what rank 0 broadcasts with the samples
    assert all(s.routed_experts is None for s in samples), "routes left in the broadcast samples"
    engine = deliver_engine_routes(header, samples, trainer._samples_of_this_rank(samples), routing.local_layers,
                                   routing.topk, routing.num_experts, control_group())
    return routing, engine


def _replay(model, trainer, samples, mode: str) -> None:
    """R2/R3 bookkeeping over an old-log-prob pass: engine routes in, routes recorded, counts reduced."""
    routing, engine = _engine_routes(model, trainer, samples, mode)
    routing.begin_step(samples, engine)
    with torch.no_grad():
        trainer._logprob_pass(model, samples)
    routing.samples = samples
    routing.replayed[:] = 1.0  # the training pass (backward) cannot run under fake CUDA
    routing.end_step()


def main(names: list[str]) -> None:
    results = {}
    for name in names or list(LAYOUTS):
        start = time.perf_counter()
        results.update(run_layout(name))
        results[f"{name}/_seconds"] = f"{time.perf_counter() - start:.1f}"
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
