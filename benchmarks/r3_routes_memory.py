"""Rank 0's host memory for R3 routes at long responses: SGLang's base64 int32 `routed_experts` decoded, checked
into the step's route table, sliced for one data-parallel rank, and aligned for one micro-batch.

    python benchmarks/r3_routes_memory.py [--responses 8] [--rows 32767] [--layers 48] [--topk 8] [--experts 128]

Defaults: one n=8 group of 32K-token sequences of Qwen3-30B-A3B (48 MoE layers, top-8 of 128 experts). Prints,
per phase, the bytes the routes hold (tensor sizes) and the process's resident memory above the start (RSS; the
peak from ru_maxrss). Responses arrive one at a time, as base64 strings in the HTTP answers, each dropped after
parsing (as the engine does).
"""
from __future__ import annotations

import argparse
import base64
import gc
import resource

import numpy as np
import torch

from grpo_megatron.replay.delivery import _slice, take_engine_routes
from grpo_megatron.rollout.sglang.protocol import decode_routed_experts
from grpo_megatron.samples import Sample
from grpo_megatron.training.batch import make_micro_batch

MB = 1e6


def rss() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / MB


def peak() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB


def held(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / MB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--responses", type=int, default=8)
    parser.add_argument("--rows", type=int, default=32767, help="len(prompt) + len(response) - 1")
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--dp", type=int, default=4, help="data-parallel size: one rank's share is delivered")
    args = parser.parse_args()
    shape = (args.rows, args.layers, args.topk)
    ids = np.random.default_rng(0).integers(0, args.experts, size=shape, dtype=np.int32).tobytes()
    gc.collect()
    start, start_peak = rss(), peak()
    print(f"{args.responses} responses x {args.rows} positions x {args.layers} layers x top-{args.topk} "
          f"({args.experts} experts); base64 per response {len(base64.b64encode(ids)) / MB:.1f} MB")

    def report(phase: str, tensors) -> None:
        gc.collect()
        print(f"{phase:<34} routes {held(tensors):8.1f} MB   RSS +{rss() - start:8.1f} MB   "
              f"peak +{peak() - start_peak:8.1f} MB")

    samples = []
    for _ in range(args.responses):
        text = base64.b64encode(ids).decode()  # one HTTP answer's routed_experts
        routes = decode_routed_experts(text, args.rows, (args.layers, args.topk), "bench")
        del text
        samples.append(Sample(prompt_ids=[1], response_ids=[1] * args.rows, group=0, routed_experts=routes))
    report(f"decoded ({samples[0].routed_experts.dtype})", [s.routed_experts for s in samples])
    engine = take_engine_routes(samples, args.layers, args.topk, args.experts, required=True)
    report("step table (take_engine_routes)", engine.table.routes.values())
    share = list(range(0, args.responses, args.dp))
    part = _slice(engine.table, share, list(range(args.layers)))
    flat = torch.cat([part.routes[i].reshape(-1) for i in share])
    report(f"one DP rank's slice ({len(share)} samples)", [flat])
    del part, flat
    mb = make_micro_batch(samples, [0], pad_id=0)
    aligned = engine.table.align(mb, 0, 1)
    report("aligned for one 32K micro-batch", [r.indices for r in aligned])


if __name__ == "__main__":
    main()
