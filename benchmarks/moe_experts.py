"""MoE experts forward+backward: grouped GEMM (`GroupedMMSequentialMLP`) vs megatron's per-expert loop.

Builds a one-layer megatron Qwen3-MoE through the project's bridge, takes the layer's experts module and
times its forward+backward on random token-expert pairs (random expert of each pair, router probabilities
in [0, 1)) with the grouped computation and with megatron's `SequentialMLP.forward` on the same weights,
alternating A B A B; prints the medians and the ratio per expert size, and which path the module's size
rule picks (`GROUPED_MAX_EXPERT_ELEMENTS`).

    python benchmarks/moe_experts.py [--sizes 128 256 512 1024] [--experts 8] [--pairs 4096] [--repeats 9]
        [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def build_experts(size: int, experts: int):
    from grpo_megatron.models import build_model, model_dims
    from grpo_megatron.models.tiny import tiny_hf_config
    from grpo_megatron.parallel import ParallelLayout, init_model_parallel

    config = tiny_hf_config("qwen3_moe", hidden_size=size, moe_intermediate_size=size, num_experts=experts,
                            num_hidden_layers=1, head_dim=64, num_attention_heads=max(size // 64, 1),
                            num_key_value_heads=max(size // 64, 1))
    init_model_parallel(ParallelLayout(), **model_dims(config))
    torch.manual_seed(0)
    return build_model(config, ParallelLayout()).chunks[0].decoder.layers[0].mlp.experts


def time_pass(forward, module, hidden, counts, probs, grad) -> float:
    start = time.perf_counter()
    out, _ = forward(module, hidden, counts, probs)
    out.backward(grad)
    return time.perf_counter() - start


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512, 1024],
                        help="hidden size = expert width")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=4096, help="token-expert pairs per pass")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from megatron.core.transformer.moe.experts import SequentialMLP

    from grpo_megatron.models.experts import GROUPED_MAX_EXPERT_ELEMENTS, GroupedMMSequentialMLP
    from grpo_megatron.parallel import init_distributed
    from grpo_megatron.platform import setup_platform

    setup_platform()
    init_distributed()
    results = []
    for size in args.sizes:
        module = build_experts(size, args.experts)
        g = torch.Generator().manual_seed(size)
        experts_of_pairs = torch.randint(0, args.experts, (args.pairs,), generator=g)
        counts = torch.bincount(experts_of_pairs, minlength=args.experts)
        hidden = torch.randn(args.pairs, size, generator=g, requires_grad=True)
        probs = torch.rand(args.pairs, generator=g, requires_grad=True)
        grad = torch.randn(args.pairs, size, generator=g)
        paths = {"grouped": GroupedMMSequentialMLP.grouped_forward, "loop": SequentialMLP.forward}
        times: dict[str, list[float]] = {name: [] for name in paths}
        for repeat in range(args.repeats + 1):
            for name, forward in paths.items():
                elapsed = time_pass(forward, module, hidden, counts, probs, grad)
                if repeat:  # the first pass of each warms up
                    times[name].append(elapsed)
        per_expert = sum(p.numel() for p in module.local_experts[0].parameters())
        row = {"size": size, "expert_weight_elements": per_expert,
               "picked": "grouped" if per_expert <= GROUPED_MAX_EXPERT_ELEMENTS else "loop",
               **{f"{name}_ms": 1e3 * statistics.median(t) for name, t in times.items()}}
        row["grouped_vs_loop"] = row["grouped_ms"] / row["loop_ms"]
        results.append(row)
        print(f"hidden = expert width {size:5d} ({per_expert / 1e3:.0f}k weights per expert): grouped "
              f"{row['grouped_ms']:.2f} ms, loop {row['loop_ms']:.2f} ms, grouped/loop {row['grouped_vs_loop']:.2f}; "
              f"the module uses: {row['picked']}", flush=True)
    print(f"settings: {args.experts} experts, {args.pairs} token-expert pairs, forward+backward, "
          f"threads {args.threads}, median of {args.repeats} alternating pairs")
    return results


if __name__ == "__main__":
    main()
