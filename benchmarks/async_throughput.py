"""Rollout modes side by side on the tiny CPU example: rollout tokens per second and time to an accuracy target.

Each mode runs examples/tiny_cpu/run.py in its own process with the same settings and thread budget
(--threads for torch in every mode; the embedded engine of one_step_off/async generates on its own Python
thread, so those modes can use two cores where sync alternates). Every mode applies the same rollout
correction (tis), so they differ only in when samples are generated. Figures come from metrics.jsonl:
tokens/s = rollout tokens of all steps / summed step time; time to target = summed step time until the
first evaluation with eval/accuracy >= --target.

With --engine sglang every mode gets a fresh real CPU SGLang server (the pinned version in the cached venv,
tests/sglang_live/install_sglang.sh) pinned to --server-cores with one OMP thread, and the trainer pinned to
--trainer-cores with one torch thread: the issue's set-up, with the same cores and threads in every mode. The
columns gen s / train s / sync s are the step's mean time/generation (sync: generating the batch; the background
modes: waiting for it), time/old_logprobs + time/train, and time/weight_sync (the push, which in one_step_off
and async without partial rollouts first waits for the batch being generated), and rollout s, the rollout side's
time generating and scoring per step (time/rollout_busy; sync: gen s): comparable gen and train in sync is where
overlapping them can approach 2x. The machine's speed drifts between runs, so --repeats N runs the modes in N
interleaved rounds and prints each figure's median.

    python benchmarks/async_throughput.py --steps 40 --eval-interval 5 --target 0.5
    python benchmarks/async_throughput.py --engine sglang --partial --steps 40 --eval-interval 5 --target 0.9
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = ("sync", "one_step_off", "async")
PARTIAL = "async+partial"


@contextlib.contextmanager
def pinned(cores: set[int] | None) -> Iterator[None]:
    """This process on `cores` while the block runs, so the processes it starts inherit them (None: unchanged)."""
    if cores is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def cores(text: str) -> set[int]:
    """"0" or "0,1" or "2-3" -> a set of CPU ids."""
    ids: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        ids.update(range(int(first), int(last or first) + 1))
    return ids


@contextlib.contextmanager
def sglang_server(work: Path, name: str, args) -> Iterator[str]:
    """A fresh real CPU SGLang server on the example's checkpoint, pinned to args.server_cores, one OMP thread."""
    sys.path.insert(0, str(REPO / "examples/tiny_cpu"))
    sys.path.insert(0, str(REPO))
    from prepare import prepare

    from grpo_megatron.parallel import free_port
    from grpo_megatron.rollout.sglang.launcher import ServerSpec, SGLangServer
    from tests.sglang_live.server import INSTALL_HINT, PYTHON, cpu_env, venv_ready

    if not venv_ready():
        raise SystemExit(f"--engine sglang needs the pinned SGLang: {INSTALL_HINT}")
    model = prepare(work / "cache", task="copy")["hf"]
    spec = ServerSpec(model_path=str(model), port=free_port(), routed_experts=True, cpu=True, python=str(PYTHON),
                      extra_args=["--dtype", "float32"])
    env = {**cpu_env(threads=1), "SGLANG_CPU_OMP_THREADS_BIND": args.server_cores}
    with pinned(cores(args.server_cores)):
        server = SGLangServer(spec, log_path=work / f"sglang_{name}.log", env=env).start()
    try:
        server.wait_healthy(600)
        yield spec.url
    finally:
        server.stop(grace_s=10)


def run_mode(mode: str, args, work: Path, round_index: int) -> dict:
    run_dir = work / f"{mode}_{round_index}"
    rollout_mode = "async" if mode == PARTIAL else mode
    command = [sys.executable, str(REPO / "examples/tiny_cpu/run.py"), "--cache", str(work / "cache"),
               "--run-dir", str(run_dir), "--train.steps", str(args.steps),
               "--eval.interval", str(args.eval_interval), "--train.num_threads", str(args.threads),
               "--checkpoint.save_interval", "0", "--rollout.mode", rollout_mode, "--rollout.max_staleness",
               str(args.max_staleness), "--algorithm.rollout_correction.mode", "tis", *args.overrides]
    if mode == PARTIAL or (args.partial and mode == "async" and args.engine == "embedded"):
        command += ["--rollout.partial_rollouts", "true"]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(REPO))
    with contextlib.ExitStack() as stack:
        if args.engine == "sglang":
            url = stack.enter_context(sglang_server(work, f"{mode}_{round_index}", args))
            command += ["--rollout-backend", "sglang", "--sglang-url", url]
            stack.enter_context(pinned(cores(args.trainer_cores)))
        proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{mode} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "time/step" in r]
    elapsed, to_target = 0.0, None
    for r in records:
        elapsed += r.get("time/step", 0.0)
        if to_target is None and r["step"] > 0 and r.get("eval/accuracy", -1.0) >= args.target:
            to_target = elapsed
    total = sum(r["time/step"] for r in steps)
    return {"tokens_per_s": sum(r["rollout/tokens"] for r in steps) / total, "step_s": total / len(steps),
            "to_target_s": to_target, "final_accuracy": next(r["eval/accuracy"] for r in reversed(records)
                                                           if "eval/accuracy" in r),
            "staleness_mean": sum(r.get("async/staleness_mean", 0.0) for r in steps) / len(steps),
            "trainer_idle_s": sum(r.get("time/trainer_idle", 0.0) for r in steps) / len(steps),
            "gen_s": sum(r.get("time/generation", 0.0) for r in steps) / len(steps),
            "train_s": sum(r.get("time/old_logprobs", 0.0) + r.get("time/train", 0.0) for r in steps) / len(steps),
            "sync_s": sum(r.get("time/weight_sync", 0.0) for r in steps) / len(steps),
            "rollout_s": sum(r.get("time/rollout_busy", r.get("time/generation", 0.0)) for r in steps) / len(steps),
            "multi_version_tokens": sum(r.get("async/multi_version_tokens", 0) for r in steps)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eval-interval", type=int, default=5)
    parser.add_argument("--target", type=float, default=0.5, help="held-out greedy accuracy to reach")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-staleness", type=int, default=1)
    parser.add_argument("--partial", action="store_true",
                        help="embedded: async with partial rollouts; sglang: async+partial as a fourth mode")
    parser.add_argument("--modes", default=None, help=f"comma-separated, of {', '.join(MODES)}, {PARTIAL}")
    parser.add_argument("--engine", choices=("embedded", "sglang"), default="embedded",
                        help="sglang: a real CPU SGLang server on its own core(s) per mode")
    parser.add_argument("--server-cores", default="1", help="--engine sglang: CPU ids of the server")
    parser.add_argument("--trainer-cores", default="0", help="--engine sglang: CPU ids of the trainer")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of all modes; then each figure's median")
    parser.add_argument("--keep", default=None, help="keep every mode's run directory (metrics.jsonl) under this path")
    args, overrides = parser.parse_known_args()
    args.overrides = overrides  # trainer overrides, the same for every mode
    modes = args.modes.split(",") if args.modes else [*MODES, *([PARTIAL] if args.partial and
                                                                 args.engine == "sglang" else [])]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        rounds = []
        for index in range(args.repeats):  # the modes one after another in every round, so drift hits them alike
            rounds.append({mode: run_mode(mode, args, work, index) for mode in modes})
            print(f"round {index + 1} of {args.repeats}", flush=True)
            print_table(rounds[-1])
    if args.repeats > 1:
        print(f"median over {args.repeats} rounds (vs sync: ratio of the medians; to target: median of the rounds "
              "that reached it, and how many did)")
        print_table({mode: median_result([r[mode] for r in rounds]) for mode in modes})
    return 0


def median_result(results: list[dict]) -> dict:
    """Each figure's median over the rounds; to_target over the rounds that reached the target."""
    reached = [r["to_target_s"] for r in results if r["to_target_s"] is not None]
    out = {key: statistics.median(r[key] for r in results) for key in results[0] if key != "to_target_s"}
    out["to_target_s"] = statistics.median(reached) if reached else None
    out["reached"] = f"{len(reached)}/{len(results)}"
    return out


def print_table(results: dict[str, dict]) -> None:
    base = results.get("sync", {}).get("tokens_per_s")
    print(f"{'mode':<15}{'tokens/s':>10}{'vs sync':>9}{'step s':>8}{'gen s':>8}{'train s':>9}{'sync s':>8}{'rollout s':>10}"
          f"{'to target s':>18}{'final acc':>11}{'staleness':>11}{'trainer idle s':>16}{'multi-ver tok':>15}")
    for mode, r in results.items():
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        target = f"{r['to_target_s']:.1f}" if r["to_target_s"] is not None else "not reached"
        if "reached" in r:
            target += f" ({r['reached']})"
        print(f"{mode:<15}{r['tokens_per_s']:>10.0f}{ratio:>9}{r['step_s']:>8.3f}{r['gen_s']:>8.3f}"
              f"{r['train_s']:>9.3f}{r['sync_s']:>8.3f}{r['rollout_s']:>10.3f}{target:>18}{r['final_accuracy']:>11.3f}"
              f"{r['staleness_mean']:>11.2f}{r['trainer_idle_s']:>16.3f}{r['multi_version_tokens']:>15.0f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
