"""Peak extra memory and time: chunked `token_logprobs_and_entropy` vs naive log_softmax + gather + entropy.

Memory: each (implementation, pass) runs once in a fresh subprocess; its extra memory is the RSS high-water
mark (`ru_maxrss`) after the run minus the one right after the inputs were allocated, so allocator caches
from earlier runs cannot hide or inflate anything.
Time: both implementations run alternately in this one process (naive, chunked, naive, chunked, ... after
one untimed run of each), so load from other processes on a shared machine hits both alike; printed are the
medians and the median of the per-pair ratios chunked/naive.

    python benchmarks/logprobs.py [--rows 8192] [--vocab 32768] [--repeats 5] [--threads N]

On a shared machine, `--threads 1` gives steadier times: with more intra-op threads than free cores,
every op waits for descheduled threads, which penalises the chunked loop's many small ops most.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
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


def worker(impl: str, backward: bool, rows: int, vocab: int) -> dict:
    logits, targets = _inputs(rows, vocab, backward)
    baseline = _max_rss_bytes()
    _run_once(impl, backward, logits, targets)
    return {"extra_bytes": _max_rss_bytes() - baseline}


def _inputs(rows: int, vocab: int, backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(rows, vocab).requires_grad_(backward), torch.randint(0, vocab, (rows,))


def alternate_times(backward: bool, rows: int, vocab: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per run of each implementation, measured alternately after one untimed run of each."""
    logits, targets = _inputs(rows, vocab, backward)
    times: dict[str, list[float]] = {impl: [] for impl in IMPLEMENTATIONS}
    for repeat in range(repeats + 1):
        for impl in IMPLEMENTATIONS:
            start = time.perf_counter()
            _run_once(impl, backward, logits, targets)
            if repeat:
                times[impl].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8192, help="B * T")
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=5, help="timed (naive, chunked) pairs per pass")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "PASS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        impl, pass_name = args.worker
        print(json.dumps(worker(impl, pass_name == "forward+backward", args.rows, args.vocab)))
        return

    full_bytes = args.rows * args.vocab * 4
    print(f"rows (B*T) = {args.rows}, V = {args.vocab}, float32 [B*T, V] = {full_bytes / 2**20:.0f} MiB, "
          f"torch threads = {torch.get_num_threads()}, {args.repeats} alternating pairs")
    print(f"{'pass':<18}{'impl':<9}{'extra MiB':>10}{'x [N,V]':>9}{'median s':>10}{'min s':>8}{'max s':>8}")
    # Every memory subprocess runs before this process allocates anything large: Linux carries the parent's
    # RSS high-water mark into a forked child (preserved across execve), which would hide the child's peak.
    memory = {(pass_name, impl): _measure_memory(impl, pass_name, args) for pass_name in PASSES for impl in IMPLEMENTATIONS}
    for pass_name in PASSES:
        times = alternate_times(pass_name == "forward+backward", args.rows, args.vocab, args.repeats)
        for impl in IMPLEMENTATIONS:
            extra, t = memory[pass_name, impl], times[impl]
            print(f"{pass_name:<18}{impl:<9}{extra / 2**20:>10.0f}{extra / full_bytes:>9.2f}"
                  f"{statistics.median(t):>10.3f}{min(t):>8.3f}{max(t):>8.3f}")
        ratios = [c / n for n, c in zip(times["naive"], times["chunked"])]
        naive_extra = memory[pass_name, "naive"]
        memory_ratio = f"{memory[pass_name, 'chunked'] / naive_extra:.3f}" if naive_extra else "n/a"
        print(f"{pass_name:<18}chunked/naive: memory {memory_ratio}, time {statistics.median(ratios):.2f} "
              f"(median of per-pair ratios; {min(ratios):.2f}-{max(ratios):.2f})")


def _measure_memory(impl: str, pass_name: str, args) -> int:
    command = [sys.executable, __file__, "--worker", impl, pass_name, "--rows", str(args.rows),
               "--vocab", str(args.vocab), "--threads", str(args.threads)]
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)["extra_bytes"]

if __name__ == "__main__":
    main()
