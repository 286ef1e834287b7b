"""Model FLOPs utilisation of the megatron policy update: achieved training FLOP/s / measured matmul peak.

The policy is this project's megatron-core Qwen3-MoE (built exactly as the Trainer builds it: the bridge's
provider, megatron DDP, megatron Adam optimizer), at a small but compute-bound shape (default hidden 1024,
4 layers, 16 heads x 64, 4 KV heads, 8 experts top-2 of width 1024, vocab 8192). One update = the Actor's
`train_step` over the micro-batches of one mini-batch: megatron forward + backward through the pipeline
schedule with the GSPO loss on chunked log-probs, then the optimizer step (its time counts, its FLOPs do not).

FLOPs counted from the shapes (model FLOPs, not hardware FLOPs; no credit for recomputation or padding):
  per token, forward = 2 * N_active  +  2 * 2 * L * (s_causal) * n_heads * head_dim
  N_active = per layer (q, k, v, o projections + router + top_k experts x 3 GLU matrices) + LM head
             (input embedding excluded: a lookup, not a matmul);
  attention: QK^T and AV over the causal half of the s x s matrix (s_causal = (s + 1) / 2 per token);
  training = 3 x forward (backward = 2 x forward).
Peak: the best of a few float32 torch.matmul of two --peak-n square matrices (2 n^3 FLOPs), same thread count.

Peak and update are measured alternately (P U P U ...) so that load from other processes on a shared
machine hits both alike; the printed fraction is the median over pairs of (update FLOP/s / peak FLOP/s
of the adjacent peak measurement), with the spread. The same fraction is also printed per CPU second of
this process (`time.process_time`, both sides): time the process spent descheduled by other jobs does not
count there, so it is the steadier figure on a shared machine (threads spinning at barriers still count).

    python benchmarks/train_mfu.py [--hidden 1024] [--seq 512] [--micro-batch 4] [--micro-batches 2] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def matmul_peak(n: int, repeats: int = 3) -> tuple[float, float]:
    """Best float32 matmul FLOP/s over `repeats`: per wall second and per CPU second of this process."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        torch.matmul(a, b)
        best, best_cpu = min(best, time.perf_counter() - start), min(best_cpu, time.process_time() - start_cpu)
    return 2 * n ** 3 / best, 2 * n ** 3 / best_cpu


def active_matmul_params(cfg) -> int:
    h, heads, kv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    attention = h * heads * d * 2 + h * kv * d * 2  # q, o; k, v
    experts = cfg.num_experts_per_tok * 3 * h * cfg.moe_intermediate_size
    router = h * cfg.num_experts
    return cfg.num_hidden_layers * (attention + experts + router) + h * cfg.vocab_size


def training_flops(cfg, seq_lengths: list[int]) -> float:
    n_active = active_matmul_params(cfg)
    attn_width = cfg.num_attention_heads * cfg.head_dim
    total = 0.0
    for s in seq_lengths:
        per_token_attention = 2 * 2 * cfg.num_hidden_layers * ((s + 1) / 2) * attn_width
        total += s * (2 * n_active + per_token_attention)
    return 3 * total


def build(args):
    from grpo_megatron.config import TrainConfig
    from grpo_megatron.models import build_model, model_dims
    from grpo_megatron.models.tiny import tiny_hf_config
    from grpo_megatron.parallel import ParallelLayout, init_distributed, init_model_parallel
    from grpo_megatron.training.actor import Actor

    hf_config = tiny_hf_config(
        "qwen3_moe", vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
        num_experts=args.experts, num_experts_per_tok=args.topk, moe_intermediate_size=args.expert_width,
        intermediate_size=4 * args.hidden, max_position_embeddings=max(4096, args.seq))
    init_distributed()
    layout = ParallelLayout()
    init_model_parallel(layout, seed=0, **model_dims(hf_config))
    policy = build_model(hf_config, layout, torch.float32, wrap_ddp=True)
    train_cfg = TrainConfig(steps=1000, num_minibatches=1, micro_batch_size=args.micro_batch, lr=1e-5)
    return hf_config, policy, Actor(policy, train_cfg, total_steps=1000)


def micro_batches(args, vocab: int):
    from grpo_megatron.samples import Sample, TrainerFields
    from grpo_megatron.training.batch import make_micro_batches

    g = torch.Generator().manual_seed(0)
    n = args.micro_batch * args.micro_batches
    prompt = args.seq // 4
    samples = [Sample(prompt_ids=torch.randint(1, vocab, (prompt,), generator=g).tolist(),
                      response_ids=torch.randint(1, vocab, (args.seq - prompt,), generator=g).tolist(),
                      group=i // 8, trainer=TrainerFields(advantage=float(torch.randn((), generator=g))))
               for i in range(n)]
    return samples, make_micro_batches(samples, list(range(n)), args.micro_batch, pad_id=0)


def gspo_loss(num_sequences: int):
    from grpo_megatron.algorithms import compute_policy_loss

    def loss_fn(mb, logprobs, entropy):
        return compute_policy_loss(logprobs, logprobs.detach(), mb.advantages, mb.response_mask, variant="gspo",
                                   clip_low=3e-4, clip_high=4e-4, loss_agg="seq_mean_token_mean",
                                   entropy=entropy, normalizer=num_sequences)
    return loss_fn


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--expert-width", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed (peak, update) pairs after one warm-up")
    parser.add_argument("--peak-n", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    hf_config, policy, actor = build(args)
    samples, micro = micro_batches(args, args.vocab)
    flops = training_flops(hf_config, [s.length for s in samples])
    loss_fn = gspo_loss(len(samples))
    optimizer_times = []
    step = actor.optimizer.step

    def timed_step(*a, **k):  # the optimizer step's share of the update, reported apart
        start = time.perf_counter()
        out = step(*a, **k)
        optimizer_times.append(time.perf_counter() - start)
        return out

    actor.optimizer.step = timed_step
    actor.train_step(micro, loss_fn, 1.0)  # warm-up
    pairs, cpu_fractions = [], []
    for _ in range(args.repeats):
        peak, peak_cpu = matmul_peak(args.peak_n)
        start, start_cpu = time.perf_counter(), time.process_time()
        actor.train_step(micro, loss_fn, 1.0)
        elapsed = time.perf_counter() - start
        cpu_fractions.append(flops / (time.process_time() - start_cpu) / peak_cpu)
        pairs.append((peak, elapsed))
    fractions = [flops / t / p for p, t in pairs]
    fb_fractions = [flops / (t - o) / p for (p, t), o in zip(pairs, optimizer_times[1:])]
    result = {
        "threads": torch.get_num_threads(), "active_params": active_matmul_params(hf_config),
        "tokens": sum(s.length for s in samples), "flops_per_update": flops,
        "update_s": statistics.median(t for _, t in pairs), "peak_flops": statistics.median(p for p, _ in pairs),
        "mfu": statistics.median(fractions), "mfu_min": min(fractions), "mfu_max": max(fractions),
        "optimizer_s": statistics.median(optimizer_times[1:]), "mfu_forward_backward": statistics.median(fb_fractions),
        "mfu_cpu_time": statistics.median(cpu_fractions), "mfu_cpu_time_min": min(cpu_fractions),
        "mfu_cpu_time_max": max(cpu_fractions),
    }
    result["achieved_flops"] = flops / result["update_s"]
    print(f"shape: hidden {args.hidden}, {args.layers} layers, {args.heads} heads x {args.hidden // args.heads} "
          f"({args.kv_heads} KV), {args.experts} experts top-{args.topk} x {args.expert_width}, vocab {args.vocab}; "
          f"{args.micro_batches} micro-batches of {args.micro_batch} x {args.seq} tokens; threads {result['threads']}")
    print(f"active matmul params {result['active_params'] / 1e6:.1f}M, {result['tokens']} tokens, "
          f"{flops / 1e9:.1f} GFLOP per update (6*N_active*tokens + causal attention)")
    print(f"update: median {result['update_s']:.3f}s -> {result['achieved_flops'] / 1e9:.1f} GFLOP/s; "
          f"fp32 matmul peak ({args.peak_n}^2): median {result['peak_flops'] / 1e9:.1f} GFLOP/s")
    print(f"MFU (update / peak, median of {len(pairs)} alternating pairs): {result['mfu']:.1%} "
          f"(min {result['mfu_min']:.1%}, max {result['mfu_max']:.1%}); target >= 50%: "
          f"{'met' if result['mfu'] >= 0.5 else 'NOT met'}")
    print(f"MFU per CPU second of this process (median of {len(pairs)}): {result['mfu_cpu_time']:.1%} "
          f"(min {result['mfu_cpu_time_min']:.1%}, max {result['mfu_cpu_time_max']:.1%})")
    print(f"of which optimizer step {result['optimizer_s']:.3f}s; forward+backward alone: "
          f"{result['mfu_forward_backward']:.1%} of peak")
    return result


if __name__ == "__main__":
    main()
