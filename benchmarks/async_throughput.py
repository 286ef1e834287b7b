"""Rollout modes side by side on the tiny CPU example: rollout tokens per second and time to an accuracy target.

Each mode runs examples/tiny_cpu/run.py in its own process with the same settings and thread budget
(--threads for torch in every mode; the embedded engine of one_step_off/async generates on its own Python
thread, so those modes can use two cores where sync alternates). Every mode applies the same rollout
correction (tis), so they differ only in when samples are generated. Figures come from metrics.jsonl:
tokens/s = rollout tokens of all steps / summed step time; time to target = summed step time until the
first evaluation with eval/accuracy >= --target.

    python benchmarks/async_throughput.py --steps 40 --eval-interval 5 --target 0.5
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = ("sync", "one_step_off", "async")


def run_mode(mode: str, args, work: Path) -> dict:
    run_dir = work / mode
    command = [sys.executable, str(REPO / "examples/tiny_cpu/run.py"), "--cache", str(work / "cache"),
               "--run-dir", str(run_dir), "--train.steps", str(args.steps),
               "--eval.interval", str(args.eval_interval), "--train.num_threads", str(args.threads),
               "--checkpoint.save_interval", "0", "--rollout.mode", mode, "--rollout.max_staleness",
               str(args.max_staleness), "--algorithm.rollout_correction.mode", "tis"]
    if args.partial and mode == "async":
        command += ["--rollout.partial_rollouts", "true"]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(REPO))
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
            "trainer_idle_s": sum(r.get("time/trainer_idle", 0.0) for r in steps) / len(steps)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eval-interval", type=int, default=5)
    parser.add_argument("--target", type=float, default=0.5, help="held-out greedy accuracy to reach")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-staleness", type=int, default=1)
    parser.add_argument("--partial", action="store_true", help="async with partial rollouts")
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {mode: run_mode(mode, args, Path(tmp)) for mode in args.modes.split(",")}
    base = results.get("sync", {}).get("tokens_per_s")
    print(f"{'mode':<14}{'tokens/s':>10}{'vs sync':>9}{'step s':>8}{'to target s':>13}{'final acc':>11}"
          f"{'staleness':>11}{'trainer idle s':>16}")
    for mode, r in results.items():
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        target = f"{r['to_target_s']:.1f}" if r["to_target_s"] is not None else "not reached"
        print(f"{mode:<14}{r['tokens_per_s']:>10.0f}{ratio:>9}{r['step_s']:>8.3f}{target:>13}"
              f"{r['final_accuracy']:>11.3f}{r['staleness_mean']:>11.2f}{r['trainer_idle_s']:>16.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
