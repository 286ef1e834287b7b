"""Weight-sync throughput (MB/s) per mode against the mock SGLang server, next to a plain in-memory copy.

The mock (tests/sglang/mock_server.py) loads into a tiny model, so the figures measure the client's transport
(pickling + shared memory, gloo broadcast, safetensors write + read) plus HTTP, not SGLang's own loader.
Usage: python benchmarks/weight_sync.py [--mb 64]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from grpo_megatron.models.tiny import make_tiny_hf_checkpoint
from grpo_megatron.rollout.sglang import DiskSync, DistributedSync, ServerPool, TensorSync
from tests.conftest import free_port
from tests.sglang.conftest import _start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=64, help="total MB pushed (repeated syncs of the tiny model)")
    args = parser.parse_args()
    import httpx

    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_hf_checkpoint("qwen3_moe", Path(tmp) / "m")
        port = free_port()
        proc = _start(model, port)
        url = f"http://127.0.0.1:{port}"
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        try:
            from safetensors.torch import load_file

            weights = [(n, t) for f in sorted(model.glob("*.safetensors")) for n, t in load_file(str(f)).items()]
            reps = max(1, (args.mb << 20) // sum(t.numel() * t.element_size() for _, t in weights))
            pool = ServerPool([url])
            start = time.perf_counter()
            total = sum(t.clone().numel() * t.element_size() for _ in range(reps) for _, t in weights)
            print(f"in-memory copy      : {total / 2**20 / (time.perf_counter() - start):9.0f} MB/s")
            for name, sync in [("tensor", TensorSync(pool, 64, 1)),
                               ("distributed (gloo)", DistributedSync(pool, 64, 1, "127.0.0.1", free_port(), "gloo")),
                               ("disk", DiskSync(pool, 64, model, None))]:
                moved, seconds = 0, 0.0
                for _ in range(reps):
                    start = time.perf_counter()
                    moved += sync.push(weights, 1)
                    seconds += time.perf_counter() - start
                sync.close()
                print(f"{name:20s}: {moved / 2**20 / seconds:9.0f} MB/s  ({moved / 2**20:.1f} MB, {reps} syncs)")
        finally:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
