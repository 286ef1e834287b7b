"""Weight-sync throughput (MB/s) per mode, against a mock or a real SGLang server, next to an in-memory copy.

    python benchmarks/weight_sync.py                         # mock server, tiny model
    python benchmarks/weight_sync.py --server sglang --size medium   # real SGLang 0.5.23 on CPU, ~120 MB model

`--server mock` (tests/sglang/mock_server.py) loads into a transformers model, so the figure is the client's
transport (pickling + shared memory, gloo broadcast, safetensors write + read) plus HTTP. `--server sglang`
starts the pinned SGLang in its cached venv (tests/sglang_live/install_sglang.sh) through the project's launcher
and includes SGLang's own loading, its begin/end session and cache flush: what a trainer step pays.
Each sync is timed alone; the script prints the median MB/s over `--syncs` pushes per mode.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from grpo_megatron.models.tiny import make_tiny_hf_checkpoint  # noqa: E402
from grpo_megatron.rollout.sglang import DiskSync, DistributedSync, ServerPool, TensorSync  # noqa: E402
from grpo_megatron.parallel import free_port  # noqa: E402

SIZES = {  # Qwen3-MoE shapes: the tests' tiny model, and one whose sync moves ~120 MB (float32)
    "tiny": {},
    "medium": {"hidden_size": 512, "intermediate_size": 1024, "moe_intermediate_size": 512, "num_hidden_layers": 4,
               "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64, "num_experts": 8},
}


def start(server: str, model: Path, logs: Path):
    """(url, stop) for a mock or real server on model."""
    port = free_port()
    if server == "sglang":
        from tests.sglang_live.server import INSTALL_HINT, start_server, venv_ready

        if not venv_ready():
            raise SystemExit(f"--server sglang needs the pinned SGLang: {INSTALL_HINT}")
        proc = start_server(model, port, logs / "sglang.log", routed_experts=False, extra_args=["--dtype", "float32"])
        return proc.spec.url, proc.stop
    from tests.sglang.conftest import _start, wait_healthy

    proc = _start(model, port)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, time.monotonic() + 120)

    def stop():
        proc.terminate()
        proc.wait(10)
    return url, stop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", choices=("mock", "sglang"), default="mock")
    parser.add_argument("--size", choices=tuple(SIZES), default="tiny")
    parser.add_argument("--syncs", type=int, default=5, help="timed pushes per mode")
    parser.add_argument("--bucket-mb", type=int, default=512)
    args = parser.parse_args()
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_hf_checkpoint("qwen3_moe", Path(tmp) / "m", **SIZES[args.size])
        weights = [(n, t) for f in sorted(model.glob("*.safetensors")) for n, t in load_file(str(f)).items()]
        mb = sum(t.numel() * t.element_size() for _, t in weights) / 2**20
        url, stop = start(args.server, model, Path(tmp))
        try:
            pool = ServerPool([url], timeout_s=600)
            rates = []
            for _ in range(args.syncs):
                begin = time.perf_counter()
                copies = [t.clone() for _, t in weights]
                rates.append(mb / (time.perf_counter() - begin))
            del copies
            print(f"{args.server} server, {args.size} Qwen3-MoE: {mb:.1f} MB per sync, median of {args.syncs} syncs, "
                  f"bucket {args.bucket_mb} MB, torch threads {torch.get_num_threads()}")
            print(f"  in-memory copy      : {statistics.median(rates):9.1f} MB/s")
            for name, sync in [("tensor", TensorSync(pool, args.bucket_mb, 1)),
                               ("distributed (gloo)", DistributedSync(pool, args.bucket_mb, 1, "127.0.0.1", free_port(),
                                                                      "gloo")),
                               ("disk", DiskSync(pool, args.bucket_mb, model, None))]:
                seconds = []
                for version in range(1, args.syncs + 1):
                    begin = time.perf_counter()
                    sync.push(weights, version)
                    seconds.append(time.perf_counter() - begin)
                sync.close()
                median = statistics.median(seconds)
                print(f"  {name:20s}: {mb / median:9.1f} MB/s  ({median:.3f} s per sync)")
        finally:
            stop()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
