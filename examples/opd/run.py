#!/usr/bin/env python
"""On-policy distillation on the CPU copy task: a larger tiny teacher, then a smaller student three ways.

    python examples/opd/run.py                 # teacher (SFT warm start + GSPO), then OPD / RL / RL + OPD students
    python examples/opd/run.py --quick         # a few steps of each, as the tests run it
    python examples/opd/run.py --student-steps 150 --teacher-run runs/opd_example/teacher   # reuse a teacher

1. Teacher: the tiny CPU example's model (Qwen3-MoE, 4 layers, hidden 128, ~1.8M parameters) trained with an SFT
   warm start and GSPO (examples/tiny_cpu/gspo_moe.yaml) until its held-out accuracy is high.
2. Student: a smaller random-init Qwen3-MoE (2 layers, hidden 64), trained from the same initial weights in three
   arms with GRPO's token-level loss: `opd` (algorithm.opd.mode distill: the teacher's per-token reverse KL is the
   advantage, rewards unused), `rl` (group advantages of the reward alone) and `rl_opd` (both, algorithm.opd.mode rl).
   The teacher is colocated (algorithm.opd.teacher megatron, its run checkpoint as algorithm.opd.megatron_path).
Prints held-out greedy accuracy per evaluation step side by side, and each run's wall-clock time, as a Markdown
table (also written to <out>/table.md). Extra arguments are overrides for the student arms.
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
TINY = HERE.parent / "tiny_cpu"
sys.path.insert(0, str(TINY))

from prepare import prepare  # noqa: E402

STUDENT_SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, intermediate_size=128)
ARMS = {
    "opd": ["--algorithm.opd.teacher", "megatron", "--algorithm.opd.mode", "distill"],
    "rl": [],
    "rl_opd": ["--algorithm.opd.teacher", "megatron", "--algorithm.opd.mode", "rl"],
}


def latest_checkpoint(run_dir: Path) -> Path:
    from grpo_megatron.training.checkpoint import latest_checkpoint as latest

    return latest(run_dir)


def make_student(cache: Path) -> Path:
    from grpo_megatron.models.tiny import make_tiny_hf_checkpoint

    path = cache / "student_qwen3_moe_hf"
    if not (path / "config.json").exists():
        make_tiny_hf_checkpoint("qwen3_moe", path, seed=3, **STUDENT_SHAPE)
    return path


def train(config: Path, overrides: list[str]) -> float:
    """One trainer run; its wall-clock seconds."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    command = [sys.executable, "-m", "grpo_megatron.train", "--config", str(config), *overrides]
    print("+", " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env)
    return time.perf_counter() - start


def accuracies(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["eval/accuracy"] for r in records if "eval/accuracy" in r}


def table(teacher_acc: float, results: dict[str, tuple[dict[int, float], float]]) -> str:
    steps = sorted(set().union(*(acc for acc, _ in results.values())))
    lines = ["| student arm | " + " | ".join(str(s) for s in steps) + " | wall-clock |",
             "| --- |" + " --- |" * (len(steps) + 1)]
    for name, (acc, wall) in results.items():
        cells = [f"{acc[s]:.3f}" if s in acc else "" for s in steps]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {wall:.0f} s |")
    lines.append(f"\nteacher held-out accuracy: {teacher_acc:.3f}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default=str(TINY / "cache"))
    parser.add_argument("--out", default="runs/opd_example")
    parser.add_argument("--teacher-steps", type=int, default=60)
    parser.add_argument("--student-steps", type=int, default=60)
    parser.add_argument("--eval-interval", type=int, default=5)
    parser.add_argument("--teacher-run", help="a finished teacher run directory to distil from instead of training one")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of opd, rl, rl_opd")
    parser.add_argument("--quick", action="store_true", help="2 teacher and 2 student steps (tests)")
    args, extra = parser.parse_known_args()
    if args.quick:
        args.teacher_steps, args.student_steps, args.eval_interval = 2, 2, 1
    out, cache = Path(args.out), Path(args.cache)
    files = prepare(cache, task="copy")
    student = make_student(cache)
    data = ["--data.train_files", str(files["train"]), "--data.eval_files", str(files["eval"]),
            "--eval.num_prompts", "16" if args.quick else "128", "--logging.progress_bar", "false"]

    teacher_dir = Path(args.teacher_run) if args.teacher_run else out / "teacher"
    teacher_wall = 0.0 if args.teacher_run else train(TINY / "gspo_moe.yaml", [
        "--run_dir", str(teacher_dir), "--model.hf_path", str(files["hf"]), "--model.megatron_path", str(files["mcore"]),
        "--train.steps", str(args.teacher_steps), "--checkpoint.save_interval", "0", "--eval.interval", "0",
        "--train.lr_warmup_steps", "0" if args.quick else "20", "--train.sft_warmup_steps", "2" if args.quick else "8",
        *data])
    teacher_acc = accuracies(teacher_dir)[max(accuracies(teacher_dir))]
    teacher_ckpt = latest_checkpoint(teacher_dir)
    print(f"teacher {teacher_ckpt}: accuracy {teacher_acc:.3f}, trained in {teacher_wall:.0f} s", flush=True)

    results = {}
    for arm in args.arms.split(","):
        run_dir = out / arm
        teacher = ["--algorithm.opd.hf_path", str(files["hf"]), "--algorithm.opd.megatron_path", str(teacher_ckpt)]
        wall = train(HERE / "student.yaml", [
            "--run_dir", str(run_dir), "--model.hf_path", str(student), "--train.steps", str(args.student_steps),
            "--eval.interval", str(args.eval_interval), *data, *ARMS[arm], *(teacher if ARMS[arm] else []), *extra])
        results[arm] = (accuracies(run_dir), wall)
    text = table(teacher_acc, results)
    (out / "table.md").write_text(text + "\n")
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
