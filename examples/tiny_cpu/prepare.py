#!/usr/bin/env python
"""Make the CPU example's inputs (cached): a tiny Qwen3-MoE checkpoint and the synthetic task's data.

The model is random-init in the Qwen3-MoE architecture (about 1.8M parameters: 4 layers, hidden 128,
8 experts top-2), saved as an HF checkpoint and converted to a megatron checkpoint with the project's
own tool, exactly as a user converts a real model. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def tiny_moe_overrides() -> dict:
    return dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, intermediate_size=256)


def prepare(cache: Path, task: str, seed: int = 0) -> dict[str, Path]:
    from grpo_megatron.models.tiny import make_tiny_hf_checkpoint
    from grpo_megatron.rollout.data.tasks import make_task_dataset

    cache.mkdir(parents=True, exist_ok=True)
    hf = cache / "tiny_qwen3_moe_hf"
    mcore = cache / "tiny_qwen3_moe_mcore"
    if not (hf / "config.json").exists():
        make_tiny_hf_checkpoint("qwen3_moe", hf, seed=seed, **tiny_moe_overrides())
    if not (mcore / "metadata.json").exists():
        subprocess.run([sys.executable, str(REPO / "tools" / "convert_hf_to_megatron.py"),
                        "--hf-path", str(hf), "--output", str(mcore)], check=True)
    train = cache / f"{task}_train.jsonl"
    evaluation = cache / f"{task}_eval.jsonl"
    if not train.exists():
        make_task_dataset(task, 20000, seed + 1, train)
    if not evaluation.exists():
        make_task_dataset(task, 128, seed + 2, evaluation)
    return {"hf": hf, "mcore": mcore, "train": train, "eval": evaluation}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", default=str(HERE / "cache"))
    parser.add_argument("--task", default="copy")
    args = parser.parse_args()
    for name, path in prepare(Path(args.cache), args.task).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
