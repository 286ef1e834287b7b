"""Weight-sync throughput (MB/s) per mode and the trainer's extra memory during a sync, through the trainer's path.

    python benchmarks/weight_sync.py                                   # mock server, tiny model, 1 process
    python benchmarks/weight_sync.py --server sglang --size medium     # real SGLang 0.5.23 on CPU, ~108 MB
    python benchmarks/weight_sync.py --server sglang --size large --layouts 1 tp2 ep2 --bucket-mb 64

A megatron policy is built from the checkpoint at each layout (`1`: one process; `tp2`, `ep2`: two gloo
processes under torchrun) and pushed as Trainer.sync_weights does: hf_buckets (each stage converts its own
layers, TP/EP shards gathered in their groups, buckets packed and handed to rank 0 while the next is assembled)
into the mode's sender. The time is the whole sync, export included. Memory: each rank resets its peak RSS
(/proc/self/clear_refs 5) before a sync and reports VmHWM - VmRSS(before) after it; the target is < 2 buckets
+ 10%. "Seconds in requests": per path, the seconds rank 0 spent inside HTTP requests, i.e. waiting on the
server's side (tensor/distributed: overlapped with the export of the next bucket; disk: after all files are
written). The in-memory copy is `copy_` of rank 0's parameters into touched memory, timed before each sync (the load here
varies), the reference each mode's copies divide.
`--server mock` (tests/sglang/mock_server.py) measures the client's transport plus HTTP; `--server sglang`
starts the pinned SGLang (tests/sglang_live/install_sglang.sh) with the project's launcher, in float32.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from grpo_megatron.models.tiny import make_tiny_hf_checkpoint  # noqa: E402
from grpo_megatron.parallel import free_port  # noqa: E402

SIZES = {  # Qwen3-MoE shapes, float32: the tests' tiny model, ~108 MB, and ~1.2 GB
    "tiny": {},
    "medium": {"hidden_size": 512, "intermediate_size": 1024, "moe_intermediate_size": 512, "num_hidden_layers": 4,
               "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64, "num_experts": 8},
    "large": {"hidden_size": 1024, "intermediate_size": 2048, "moe_intermediate_size": 1024, "num_hidden_layers": 6,
              "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 64, "num_experts": 16},
}
LAYOUTS = {"1": (1, []), "tp2": (2, ["--tp", "2"]), "ep2": (2, ["--ep", "2"]), "tp2ep2": (4, ["--tp", "2", "--ep", "2"])}
MODES = ("export", "tensor", "distributed", "disk")  # export: the stream drained on rank 0, sent nowhere


def start(server: str, model: Path, logs: Path):
    """(url, stop) for a mock or real server on model."""
    port = free_port()
    if server == "sglang":
        from tests.sglang_live.server import INSTALL_HINT, start_server, venv_ready

        if not venv_ready():
            raise SystemExit(f"--server sglang needs the pinned SGLang: {INSTALL_HINT}")
        proc = start_server(model, port, logs / "sglang.log", routed_experts=False, extra_args=["--dtype", "float32"],
                            timeout_s=1800)  # a loaded machine took > 600 s for the large model
        return proc.spec.url, proc.stop
    from tests.sglang.conftest import _start, wait_healthy

    proc = _start(model, port)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, time.monotonic() + 300)

    def stop():
        proc.terminate()
        proc.wait(10)
    return url, stop


def _status_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def worker(args) -> None:
    """One rank under torchrun (or alone): build, load, then time `--syncs` pushes per mode; rank 0 prints JSON."""
    import torch.distributed as dist

    from grpo_megatron.models import build_loaded_policy
    from grpo_megatron.models.weight_stream import hf_buckets, plain_alloc
    from grpo_megatron.parallel import control_group, init_distributed, layout_from_args
    from grpo_megatron.process_setup import share_cpu_tensors_by_name
    from grpo_megatron.rollout.sglang import DiskSync, DistributedSync, ServerPool, TensorSync

    rank, world = init_distributed()
    share_cpu_tensors_by_name()
    model = build_loaded_policy(args.model, layout_from_args(args))
    pool = ServerPool([args.url], timeout_s=900)
    requests = time_requests(pool)
    for mode in args.modes:
        sync = None
        if rank == 0 and mode != "export":
            sync = {"tensor": lambda: TensorSync(pool, args.bucket_mb, 1),
                    "distributed": lambda: DistributedSync(pool, args.bucket_mb, 1, "", free_port(), "gloo"),
                    "disk": lambda: DiskSync(pool, args.bucket_mb, args.model, None)}[mode]()
        seconds, request_s, extra_mb, ratios, moved = [], [], [], [], 0
        for version in range(1, args.syncs + 1):
            copy = copy_rate(model) if rank == 0 else 0.0  # interleaved: the load on this machine varies
            if world > 1:
                dist.barrier(group=control_group())
            Path("/proc/self/clear_refs").write_text("5")
            before = _status_kb("VmRSS")
            requests.clear()
            begin = time.perf_counter()
            buckets = hf_buckets(model, int(args.bucket_mb * 2**20), False, sync.alloc if sync else plain_alloc)
            if sync is not None:
                moved = sync.push_buckets(buckets, version)
            else:
                moved = sum(bucket.nbytes for bucket in buckets)
            seconds.append(time.perf_counter() - begin)
            request_s.append(dict(requests))
            ratios.append(moved / 2**20 / seconds[-1] / copy if copy else 0.0)
            extra_mb.append((_status_kb("VmHWM") - before) / 1024)
        peaks = [max(extra_mb)]
        if world > 1:
            everyone: list = [None] * world
            dist.all_gather_object(everyone, max(extra_mb), group=control_group())
            peaks = everyone
        if rank == 0:
            if sync is not None:
                sync.close()
            median = statistics.median(seconds)
            requests_s = {path: statistics.median(r.get(path, 0.0) for r in request_s) for path in request_s[-1]}
            print(json.dumps({"mode": mode, "mb": moved / 2**20, "seconds": median, "mb_per_s": moved / 2**20 / median,
                              "requests_s": requests_s, "of_copy": statistics.median(ratios),
                              "extra_mb_per_rank": peaks}), flush=True)


def time_requests(pool) -> dict[str, float]:
    """Wrap pool.call so that the seconds spent in each request path add up in the returned dict: the server's
    side of a sync (its load_weights; for disk mode also its file reads; the session's begin and end)."""
    seconds, call = {}, pool.call

    def timed(url, method, path, *rest, **kwargs):
        begin = time.perf_counter()
        try:
            return call(url, method, path, *rest, **kwargs)
        finally:
            seconds[path] = seconds.get(path, 0.0) + time.perf_counter() - begin
    pool.call = timed
    return seconds


def copy_rate(model, repeats: int = 3) -> float:
    """MB/s of copying this rank's parameters into memory already touched once (a `clone()`, then `copy_` into
    the clones, best of `repeats`): the steady-state in-memory copy each sync is compared with, free of the
    first-touch page faults that made a timed `clone()` range from 1.1 to 6 GB/s on the 1.2 GB model."""
    params = [p.detach() for chunk in model.unwrapped() for p in chunk.parameters()]
    copies = [p.clone() for p in params]
    best = float("inf")
    for _ in range(repeats):
        begin = time.perf_counter()
        for copy, param in zip(copies, params):
            copy.copy_(param)
        best = min(best, time.perf_counter() - begin)
    del copies
    return sum(p.numel() * p.element_size() for p in params) / 2**20 / best


def run_layout(name: str, args, model: Path, url: str) -> list[dict]:
    nproc, flags = LAYOUTS[name]
    cmd = [__file__, "--worker", "--model", str(model), "--url", url, "--syncs", str(args.syncs),
           "--bucket-mb", str(args.bucket_mb), "--modes", *args.modes, *flags]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for key in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    launcher = ([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                 f"--master-port={free_port()}"] if nproc > 1 else [sys.executable])
    done = subprocess.run(launcher + cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"layout {name} failed:\n{done.stderr[-4000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", choices=("mock", "sglang"), default="mock")
    parser.add_argument("--size", choices=tuple(SIZES), default="tiny")
    parser.add_argument("--layouts", nargs="+", choices=tuple(LAYOUTS), default=["1"])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--syncs", type=int, default=3, help="timed pushes per mode")
    parser.add_argument("--bucket-mb", type=float, default=512)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    from grpo_megatron.parallel import add_layout_arguments

    add_layout_arguments(parser)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_hf_checkpoint("qwen3_moe", Path(tmp) / "m", **SIZES[args.size])
        mb = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**20
        print(f"{args.server} server, {args.size} Qwen3-MoE (float32): ~{mb:.1f} MB per sync, median of {args.syncs} "
              f"syncs, bucket {args.bucket_mb:g} MiB (memory target < {2.2 * args.bucket_mb:.1f} MiB), "
              f"torch threads 1; 'of copy': median over syncs of MB/s / an in-memory copy's MB/s timed just before")
        url, stop = start(args.server, model, Path(tmp))
        try:
            for layout in args.layouts:
                for row in run_layout(layout, args, model, url):
                    extra = ", ".join(f"{m:.0f}" for m in row["extra_mb_per_rank"])
                    requests = ", ".join(f"{path.lstrip('/')} {s:.2f}" for path, s in row["requests_s"].items())
                    print(f"  {layout:6s} {row['mode']:11s}: {row['mb_per_s']:8.1f} MB/s ({row['seconds']:.2f} s, "
                          f"{row['of_copy']:.3f} of copy); extra memory per rank [{extra}] MiB; seconds in requests: "
                          f"{requests or '-'}", flush=True)
        finally:
            stop()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
