#!/usr/bin/env python
"""Fixed vs adaptive truncation bound (TIS) under a real train-rollout mismatch, on the CPU example.

The trainer runs the tiny Qwen3-MoE in float32; the rollout engine runs the same weights in bfloat16, or
with `--engine fp8` with every weight matrix also quantised to float8 e4m3 (per-tensor scale, as FP8
rollout engines do); `--engine-temperature T` makes the engine also sample (and score) at temperature T
while the trainer scores at rollout.temperature 1, a far larger mismatch. Both runs share seed, data and engine; only algorithm.rollout_correction differs:

    fixed      mode tis, high H                       (slime --use-tis / verl: H = 2)
    adaptive   mode tis, high H, adaptive_ess_target  (the largest bound <= H keeping ESS >= target)

    OMP_NUM_THREADS=1 python benchmarks/rollout_correction.py --engine fp8 --steps 6
    OMP_NUM_THREADS=1 python benchmarks/rollout_correction.py --engine fp8 --engine-temperature 1.3 --steps 6

Per step it prints the raw divergence (chi2_token, ess_raw) and, for each run, the bound used, the ESS
of the truncated weights and the fraction of tokens truncated, then the mean reward of the run.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "examples" / "tiny_cpu"))

from grpo_megatron.config import load_config  # noqa: E402
from grpo_megatron.rollout.engines.embedded import EmbeddedEngine  # noqa: E402
from grpo_megatron.training.loop import Trainer  # noqa: E402

FP8_MAX = 448.0  # largest float8 e4m3fn value


class QuantisedEngine(EmbeddedEngine):
    """The embedded engine with its weight matrices rounded through float8 e4m3 on every weight sync,
    optionally sampling at its own temperature."""

    temperature: float | None = None
    fp8: bool = True

    def generate(self, prompts, params, return_routed_experts=False):
        if self.temperature is not None and params.temperature > 0:
            params = dataclasses.replace(params, temperature=self.temperature)
        return super().generate(prompts, params, return_routed_experts)

    def update_weights(self, named_tensors, version):
        super().update_weights([(name, _fp8_round(t) if self.fp8 and t.dim() >= 2 else t)
                                for name, t in named_tensors], version)


def _fp8_round(t: torch.Tensor) -> torch.Tensor:
    scale = t.abs().amax().clamp(min=1e-12) / FP8_MAX
    return ((t / scale).to(torch.float8_e4m3fn).to(t.dtype) * scale)


def run(args, correction: dict, run_dir: Path) -> list[dict]:
    from prepare import prepare

    files = prepare(Path(args.cache), task="copy")
    cfg = load_config(REPO / "examples" / "tiny_cpu" / "gspo_moe.yaml", {
        "run_dir": str(run_dir),
        "model": {"hf_path": str(files["hf"]), "megatron_path": str(files["mcore"])},
        "data": {"train_files": [str(files["train"])], "eval_files": [str(files["eval"])]},
        "rollout": {"prompts_per_step": 8},
        "algorithm": {"rollout_correction": correction},
        "train": {"steps": args.steps, "lr_warmup_steps": 0, "sft_warmup_steps": args.sft_steps},
        "checkpoint": {"save_interval": 0}, "eval": {"interval": 0, "num_prompts": 16},
        "logging": {"progress_bar": False, "tensorboard": False},
    })
    trainer = Trainer(cfg)
    trainer.rollouts.engine.shutdown()
    trainer.rollouts.engine = QuantisedEngine(cfg.model.hf_path, dtype=torch.bfloat16, seed=cfg.train.seed)
    trainer.rollouts.engine.fp8, trainer.rollouts.engine.temperature = args.engine == "fp8", args.engine_temperature
    trainer.sft_warmup()
    trainer.sync_weights()
    history = [trainer.train_step() for _ in range(args.steps)]
    trainer.close()
    return history


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=("bf16", "fp8"), default="fp8")
    parser.add_argument("--engine-temperature", type=float, default=None)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--sft-steps", type=int, default=4)
    parser.add_argument("--high", type=float, default=2.0, help="fixed bound, and the adaptive one's ceiling")
    parser.add_argument("--ess-target", type=float, default=0.99)
    parser.add_argument("--cache", default=str(REPO / "examples" / "tiny_cpu" / "cache"))
    parser.add_argument("--run-dir", default="runs/rollout_correction_bench")
    args = parser.parse_args()
    torch.set_num_threads(1)
    fixed = run(args, {"mode": "tis", "high": args.high}, Path(args.run_dir) / "fixed")
    adaptive = run(args, {"mode": "tis", "high": args.high, "adaptive_ess_target": args.ess_target},
                   Path(args.run_dir) / "adaptive")
    p = "rollout_correction/"
    print(f"engine {args.engine} (bf16 compute, temperature {args.engine_temperature or 1.0}) vs fp32 trainer; fixed bound {args.high}, "
          f"adaptive ESS target {args.ess_target}")
    print(f"{'step':>4} | {'chi2_tok':>9} {'ess_raw':>8} | {'fixed: C':>8} {'ess':>7} {'trunc':>7} | "
          f"{'adapt: C':>8} {'ess':>7} {'trunc':>7}")
    for step, (f, a) in enumerate(zip(fixed, adaptive), start=1):
        print(f"{step:>4} | {f[p + 'chi2_token']:9.2e} {f[p + 'ess_raw']:8.5f} | {f[p + 'bound']:8.4f} "
              f"{f[p + 'ess']:7.5f} {f[p + 'frac_truncated']:7.4f} | {a[p + 'bound']:8.4f} {a[p + 'ess']:7.5f} "
              f"{a[p + 'frac_truncated']:7.4f}")
    for name, history in (("fixed", fixed), ("adaptive", adaptive)):
        rewards = [m["reward/mean"] for m in history]
        print(f"{name:>8}: reward/mean per step {' '.join(f'{r:.3f}' for r in rewards)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
