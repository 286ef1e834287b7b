#!/usr/bin/env python
"""The CPU example end to end: make the tiny MoE model and data, SFT warm start, GSPO, report accuracy.

    python examples/tiny_cpu/run.py                  # full run (~5-10 min on 2 cores)
    python examples/tiny_cpu/run.py --quick          # a few steps, as CI runs it
    python examples/tiny_cpu/run.py --nproc 2 --ep 2 # two gloo processes, experts split over them
    python examples/tiny_cpu/run.py --rollout-backend sglang                      # rollouts from a real SGLang
    python examples/tiny_cpu/run.py --rollout-backend sglang --sglang-url URL     # ... server already running

With `--rollout-backend sglang` and no `--sglang-url`, a CPU SGLang server is started on the example's checkpoint
through the project's launcher (the pinned SGLang in the cached venv that tests/sglang_live/install_sglang.sh
makes, with that directory's CPU adaptation) and stopped at the end; after every optimizer step the trainer
pushes its weights to it (`--weight-sync`, default tensor: colocated, shared memory).

Any extra arguments are trainer overrides (e.g. --algorithm.loss grpo --algorithm.clip_low 0.2).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from prepare import prepare  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(HERE / "gspo_moe.yaml"))
    parser.add_argument("--cache", default=str(HERE / "cache"))
    parser.add_argument("--run-dir", default="runs/tiny_cpu_gspo")
    parser.add_argument("--quick", action="store_true", help="4 RL steps with a short warm start (CI)")
    parser.add_argument("--nproc", type=int, default=1, help="processes (torchrun, gloo)")
    parser.add_argument("--ep", type=int, default=1, help="expert parallel size")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    parser.add_argument("--rollout-backend", choices=("embedded", "sglang"), default="embedded",
                        help="generate in the trainer process or on SGLang server(s)")
    parser.add_argument("--sglang-url", action="append", default=[], help="a running SGLang server (repeatable)")
    parser.add_argument("--weight-sync", choices=("tensor", "distributed", "disk"), default="tensor")
    parser.add_argument("--sglang-dtype", default="float32", help="dtype of a server this script starts")
    args, overrides = parser.parse_known_args()

    started = time.perf_counter()
    files = prepare(Path(args.cache), task="copy")
    overrides = ["--run_dir", args.run_dir, "--model.hf_path", str(files["hf"]),
                 "--model.megatron_path", str(files["mcore"]), "--data.train_files", str(files["train"]),
                 "--data.eval_files", str(files["eval"]), "--expert-model-parallel-size", str(args.ep),
                 "--tensor-model-parallel-size", str(args.tp), *overrides]
    if args.quick:
        overrides = ["--train-iters", "4", "--train.sft_warmup_steps", "2", "--train.lr_warmup_steps", "0", "--eval.interval", "0",
                     "--eval.num_prompts", "16", "--checkpoint.save_interval", "2", *overrides]
    server = None
    if args.rollout_backend == "sglang":
        urls = args.sglang_url
        if not urls:
            server = start_cpu_sglang(files["hf"], Path(args.run_dir), args.sglang_dtype)
            urls = [server.spec.url]
        overrides = ["--rollout.engine", "sglang", "--rollout.sglang.urls", ",".join(urls),
                     "--rollout.sglang.weight_sync", args.weight_sync, *overrides]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    if args.nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}",
                   "-m", "grpo_megatron.train"]
    else:
        command = [sys.executable, "-m", "grpo_megatron.train"]
    command += ["--config", args.config, *overrides]
    print("+", " ".join(command), flush=True)
    try:
        subprocess.run(command, check=True, env=env)
    finally:
        if server is not None:
            server.stop()
    report(Path(args.run_dir), time.perf_counter() - started)
    return 0


def start_cpu_sglang(model_dir: Path, run_dir: Path, dtype: str):
    """A real SGLang server on this CPU, started by the project's launcher (tests/sglang_live/server.py)."""
    sys.path.insert(0, str(HERE.parents[1]))
    from grpo_megatron.parallel import free_port
    from tests.sglang_live.server import INSTALL_HINT, start_server, venv_ready

    if not venv_ready():
        raise SystemExit(f"--rollout-backend sglang without --sglang-url needs the pinned SGLang: {INSTALL_HINT}")
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "sglang_server.log"
    print(f"starting SGLang on {model_dir} (log {log}) ...", flush=True)
    server = start_server(model_dir, free_port(), log, routed_experts=True,
                          extra_args=["--dtype", dtype])
    print(f"SGLang healthy at {server.spec.url}", flush=True)
    return server


def report(run_dir: Path, wall: float) -> None:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [(r["step"], r["eval/accuracy"]) for r in records if "eval/accuracy" in r]
    steps = [r for r in records if "time/step" in r]
    phases = sorted({k for r in steps for k in r if k.startswith("time/")})
    print(f"\n== tiny CPU example: {run_dir} ==")
    if evals:
        print(f"held-out accuracy (greedy): before RL {evals[0][1]:.3f} (step {evals[0][0]}) -> "
              f"after RL {evals[-1][1]:.3f} (step {evals[-1][0]})")
    print(f"sampled reward: first step {steps[0]['reward/mean']:.3f} -> last step {steps[-1]['reward/mean']:.3f}")
    print(f"wall time {wall:.0f} s for {len(steps)} RL steps; mean time per phase:")
    for key in phases:
        print(f"  {key[5:]:<14} {sum(r.get(key, 0.0) for r in steps) / len(steps):.3f} s")


if __name__ == "__main__":
    sys.exit(main())
