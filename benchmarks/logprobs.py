"""Peak extra memory and time: chunked `token_logprobs_and_entropy` vs naive log_softmax + gather + entropy.

Each (implementation, pass) runs in a fresh subprocess; its extra memory is the RSS high-water mark
(`ru_maxrss`) after the run minus the one right after the inputs were allocated, so allocator caches
from earlier runs cannot hide or inflate anything. Time is the best of a few repeats.

    python benchmarks/logprobs.py [--rows 8192] [--vocab 32768] [--repeats 3] [--threads N]

On a shared machine, `--threads 1` gives steadier times: with more intra-op threads than free cores,
every op waits for descheduled threads, which penalises the chunked loop's many small ops most.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from grpo_megatron.algorithms.logprobs import token_logprobs_and_entropy


def naive_logprobs_and_entropy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(log_p.exp() * log_p).sum(-1)


IMPLEMENTATIONS = {"naive": naive_logprobs_and_entropy, "chunked": token_logprobs_and_entropy}
PASSES = ("forward", "forward+backward")


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _run_once(impl: str, backward: bool, logits: torch.Tensor, targets: torch.Tensor) -> None:
    logits.grad = None
    with torch.set_grad_enabled(backward):
        logprobs, entropy = IMPLEMENTATIONS[impl](logits, targets)
        if backward:
            (logprobs.sum() + 0.01 * entropy.sum()).backward()


def worker(impl: str, backward: bool, rows: int, vocab: int, repeats: int) -> dict:
    torch.manual_seed(0)
    logits = torch.randn(rows, vocab).requires_grad_(backward)
    targets = torch.randint(0, vocab, (rows,))
    baseline = _max_rss_bytes()
    _run_once(impl, backward, logits, targets)
    extra = _max_rss_bytes() - baseline
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _run_once(impl, backward, logits, targets)
        times.append(time.perf_counter() - start)
    return {"extra_bytes": extra, "seconds": min(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8192, help="B * T")
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "PASS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        impl, pass_name = args.worker
        print(json.dumps(worker(impl, pass_name == "forward+backward", args.rows, args.vocab, args.repeats)))
        return

    full_bytes = args.rows * args.vocab * 4
    print(f"rows (B*T) = {args.rows}, V = {args.vocab}, float32 [B*T, V] = {full_bytes / 2**20:.0f} MiB, "
          f"torch threads = {torch.get_num_threads()}")
    print(f"{'pass':<18}{'impl':<9}{'extra MiB':>10}{'x [N,V]':>9}{'seconds':>9}")
    for pass_name in PASSES:
        results = {}
        for impl in IMPLEMENTATIONS:
            command = [sys.executable, __file__, "--worker", impl, pass_name, "--rows", str(args.rows),
                       "--vocab", str(args.vocab), "--repeats", str(args.repeats), "--threads", str(args.threads)]
            results[impl] = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
            r = results[impl]
            print(f"{pass_name:<18}{impl:<9}{r['extra_bytes'] / 2**20:>10.0f}{r['extra_bytes'] / full_bytes:>9.2f}{r['seconds']:>9.3f}")
        naive, chunked = results["naive"], results["chunked"]
        print(f"{pass_name:<18}chunked/naive: memory {chunked['extra_bytes'] / naive['extra_bytes']:.3f}, "
              f"time {chunked['seconds'] / naive['seconds']:.2f}")


if __name__ == "__main__":
    main()
