"""Step-time overhead of MoE routing replay (R2, R3) against none, on the CPU example's tiny Qwen3-MoE.

Each mode runs in its own trainer process (`--worker`); rounds alternate the modes so that load from other
processes on a shared machine hits all of them alike. Reported per mode: the median of the timed steps'
whole step time and of their trainer-side time (old log-probs + training: where R2 records and replays,
and R3 replays; R3's extra rollout cost, the engine recording routes, is in the whole step), and the
overhead of each against none.

    python benchmarks/replay_overhead.py [--rounds 2] [--steps 4] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = ("none", "r2", "r3")


def config_for(mode: str, inputs: dict, run_dir: Path, steps: int, threads: int):
    from grpo_megatron.config import load_config

    return load_config(REPO / "examples" / "tiny_cpu" / "gspo_moe.yaml", {
        "run_dir": str(run_dir),
        "model": {"hf_path": str(inputs["hf"]), "megatron_path": str(inputs["mcore"])},
        "data": {"train_files": [str(inputs["train"])], "eval_files": []},
        "algorithm": {"routing_replay": mode},
        "train": {"steps": steps, "sft_warmup_steps": 0, "lr_warmup_steps": 0, "num_threads": threads},
        "logging": {"progress_bar": False, "tensorboard": False},
        "checkpoint": {"save_interval": 0},
    })


def worker(mode: str, cache: Path, steps: int, threads: int) -> dict:
    """One trainer: a warm-up step, then `steps` timed steps."""
    sys.path.insert(0, str(REPO / "examples" / "tiny_cpu"))
    from prepare import prepare

    from grpo_megatron.training.loop import Trainer

    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(config_for(mode, prepare(cache, "copy"), Path(run_dir), steps + 1, threads))
        trainer.train_step()
        timed = [trainer.train_step() for _ in range(steps)]
        trainer.close()
    return {
        "step": [m["time/step"] for m in timed],
        "trainer": [m["time/old_logprobs"] + m["time/train"] for m in timed],
        "agree_old_current": statistics.mean(m.get("routing/agree_old_current", float("nan")) for m in timed),
        "agree_rollout_train": statistics.mean(m.get("routing/agree_rollout_train", float("nan")) for m in timed),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per mode and round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", default=str(REPO / "examples" / "tiny_cpu" / "cache"))
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, Path(args.cache), args.steps, args.threads)))
        return 0
    results = {mode: {"step": [], "trainer": [], "agree_old_current": [], "agree_rollout_train": []} for mode in MODES}
    for round_index in range(args.rounds):
        for mode in MODES if round_index % 2 == 0 else MODES[::-1]:
            out = subprocess.run([sys.executable, __file__, "--worker", mode, "--steps", str(args.steps),
                                  "--threads", str(args.threads), "--cache", args.cache],
                                 capture_output=True, text=True, check=True, cwd=REPO)
            run = json.loads(out.stdout.strip().splitlines()[-1])
            for key in ("step", "trainer"):
                results[mode][key] += run[key]
            for key in ("agree_old_current", "agree_rollout_train"):
                results[mode][key].append(run[key])
    base = {key: statistics.median(results["none"][key]) for key in ("step", "trainer")}
    print(f"{'mode':<6}{'step s':>9}{'overhead':>10}{'trainer s':>11}{'overhead':>10}"
          f"{'agree old/cur':>15}{'agree rollout/train':>21}")
    for mode in MODES:
        step, trainer = (statistics.median(results[mode][key]) for key in ("step", "trainer"))
        print(f"{mode:<6}{step:>9.3f}{100 * (step / base['step'] - 1):>9.1f}%{trainer:>11.3f}"
              f"{100 * (trainer / base['trainer'] - 1):>9.1f}%{statistics.mean(results[mode]['agree_old_current']):>15.4f}"
              f"{statistics.mean(results[mode]['agree_rollout_train']):>21.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
