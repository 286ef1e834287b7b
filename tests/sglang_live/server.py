"""Start a real SGLang server (the pinned version, in its cached venv) on CPU through the project's launcher.

    python -m tests.sglang_live.server MODEL_DIR [--port 30000] [--routed-experts]   # runs until Ctrl-C

The venv is made by tests/sglang_live/install_sglang.sh; the CPU adaptation is tests/sglang_live/cpu_site
(put on the server's PYTHONPATH with GRPO_SGLANG_CPU_ADAPT=1).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from grpo_megatron.rollout.sglang.launcher import ServerSpec, SGLangServer

SGLANG_VERSION = "0.5.23"
HERE = Path(__file__).resolve().parent
VENV = Path(os.environ.get("SGLANG_LIVE_VENV",
                           Path.home() / ".cache" / "grpo_megatron" / f"sglang-{SGLANG_VERSION}"))
PYTHON = VENV / "bin" / "python"
INSTALL_HINT = f"run tests/sglang_live/install_sglang.sh (~10 min, 11 GB) to make {VENV}"


def venv_ready() -> bool:
    return (VENV / f".installed-sglang-{SGLANG_VERSION}").is_file() and PYTHON.is_file()


def cpu_env(threads: int = 1) -> dict[str, str]:
    """Environment of a CPU server: the adaptation on PYTHONPATH, no GPU, few threads."""
    return {"PYTHONPATH": str(HERE / "cpu_site"), "GRPO_SGLANG_CPU_ADAPT": "1", "SGLANG_USE_CPU_ENGINE": "1",
            "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(threads), "SGLANG_CPU_OMP_THREADS_BIND": "all",
            "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def start_server(model_dir: str | Path, port: int, log_path: str | Path, routed_experts: bool = True,
                 extra_args: list[str] | None = None, timeout_s: float = 600.0) -> SGLangServer:
    spec = ServerSpec(model_path=str(model_dir), port=port, routed_experts=routed_experts, cpu=True,
                      python=str(PYTHON), extra_args=list(extra_args or []))
    server = SGLangServer(spec, log_path=log_path, env=cpu_env()).start()
    try:
        server.wait_healthy(timeout_s)
    except BaseException:
        server.stop(grace_s=5)
        raise
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--log", default="sglang_server.log")
    parser.add_argument("--routed-experts", action="store_true")
    args, extra = parser.parse_known_args()
    started = time.monotonic()
    server = start_server(args.model_dir, args.port, args.log, args.routed_experts, extra)
    print(f"SGLang {SGLANG_VERSION} healthy at {server.spec.url} after {time.monotonic() - started:.0f} s "
          f"(pid {server.process.pid}, log {args.log})", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill` stops the server's process group too
    try:
        server.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
