"""First-GPU checks of the configuration CPU runs cannot fully show, on a tiny Qwen3-MoE made here, in bf16:

- `sft`: an SFT warm start survives the first RL step (one at learning rate 0 leaves the post-SFT weights bit-equal),
  with megatron's mixed-precision optimizer and with the distributed optimizer (fp32 masters in both);
- `diversity`: the rollout engine's seeded groups at temperature 1 are not G copies of one response;
- `r3`: one RL step with rollout routing replay (the engine's routes replayed in the trainer's passes).

    python -m grpo_megatron.smoke WORKDIR [--allow-cpu] [--checks sft diversity r3]

Prints one JSON line per check and exits 1 if any failed; scripts/gpu_smoke.sh runs it from the installed wheel.
Every pass runs on the platform's device (the GPU when there is one: the embedded engine generates there).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


class SmokeFailure(AssertionError):
    """A check saw the GPU configuration do the wrong thing."""


def make_smoke_files(workdir: str | Path) -> dict[str, Path]:
    """The tiny model and the task's train/eval files (made once per workdir)."""
    from grpo_megatron.models.tiny import make_tiny_hf_checkpoint
    from grpo_megatron.rollout.data.tasks import make_task_dataset

    root = Path(workdir)
    hf = root / "tiny_qwen3_moe"
    return {"hf": hf if (hf / "config.json").exists() else make_tiny_hf_checkpoint("qwen3_moe", hf, seed=0),
            "train": make_task_dataset("first_digit", 200, 0, root / "train.jsonl"),
            "eval": make_task_dataset("first_digit", 16, 1, root / "eval.jsonl")}


def _trainer(files: dict, run_dir: Path, **sections):
    from grpo_megatron.config import load_config
    from grpo_megatron.training.loop import Trainer

    base = {"run_dir": str(run_dir), "model": {"hf_path": str(files["hf"]), "dtype": "bfloat16"},
            "data": {"train_files": [str(files["train"])], "eval_files": [str(files["eval"])]},
            "rollout": {"prompts_per_step": 4, "group_size": 4, "max_new_tokens": 6},
            "reward": {"functions": [{"name": "first_digit"}]}, "algorithm": {"loss": "gspo"},
            "train": {"steps": 1, "num_minibatches": 1, "micro_batch_size": 4, "lr": 1e-3},
            "logging": {"progress_bar": False, "tensorboard": False}, "eval": {"num_prompts": 8}}
    for section, values in sections.items():
        base[section] = {**base.get(section, {}), **values}
    return Trainer(load_config(None, base))


def _params(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for c in trainer.learner.policy.chunks for n, p in c.named_parameters()}


def check_sft_warm_start(files: dict, workdir: Path) -> dict:
    result = {}
    for name, distributed in (("float16", False), ("distributed", True)):
        trainer = _trainer(files, workdir / f"sft_{name}", train={"lr": 0.0, "sft_warmup_steps": 2, "sft_lr": 3e-2,
                                                                 "distributed_optimizer": distributed})
        before = _params(trainer)
        trainer.sft_warmup()
        after_sft = _params(trainer)
        trainer.train_step()
        trainer.close()
        moved = max(float((after_sft[n].float() - before[n].float()).abs().max()) for n in before)
        undone = [n for n, p in _params(trainer).items() if not torch.equal(p, after_sft[n])]
        if moved == 0.0 or undone:
            raise SmokeFailure(f"{name} optimizer: SFT moved the weights by {moved:.3g}; the zero-lr RL step then "
                               f"changed {len(undone)} tensors, e.g. {undone[:2]}")
        result[name] = {"sft_max_change": moved, "device": str(next(iter(after_sft.values())).device)}
    return result


def check_group_diversity(files: dict, workdir: Path) -> dict:
    trainer = _trainer(files, workdir / "diversity", rollout={"temperature": 1.0, "group_size": 8})
    items = [trainer.learner.train_data[i] for i in range(8)]
    params = trainer.rollouts.sampling_params(seed_offset=1)
    groups = trainer.rollouts.engine.generate([it["prompt_ids"] for it in items], params)
    again = trainer.rollouts.engine.generate([it["prompt_ids"] for it in items], params)
    trainer.close()
    responses = [[tuple(o.response_ids) for o in group] for group in groups]
    identical = sum(len(set(group)) == 1 for group in responses)
    if identical:
        raise SmokeFailure(f"{identical} of {len(responses)} seeded groups of {params.n} samples at temperature 1 "
                           f"are {params.n} copies of one response: every advantage of those groups is 0")
    repeated = responses == [[tuple(o.response_ids) for o in group] for group in again]
    return {"groups": len(responses), "distinct_per_group": [len(set(g)) for g in responses],
            "same_seed_same_samples": repeated}


def check_r3_step(files: dict, workdir: Path) -> dict:
    varied = {"name": "length", "options": {"max_words": 1, "penalty_per_word": 0.2}}  # differs within a group
    trainer = _trainer(files, workdir / "r3", algorithm={"routing_replay": "r3"}, rollout={"temperature": 1.0},
                       reward={"functions": [varied]})
    metrics = trainer.train_step()
    trainer.close()
    agree = metrics.get("routing/agree_rollout_train")
    if agree is None or not metrics["train/grad_norm"] > 0 or not agree >= 0.9:
        raise SmokeFailure(f"R3 step: routing/agree_rollout_train {agree}, grad_norm {metrics['train/grad_norm']}")
    return {"agree_rollout_train": agree, "grad_norm": metrics["train/grad_norm"]}


CHECKS = {"sft": check_sft_warm_start, "diversity": check_group_diversity, "r3": check_r3_step}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir")
    parser.add_argument("--allow-cpu", action="store_true", help="run without a GPU (to check the checks)")
    parser.add_argument("--checks", nargs="+", choices=list(CHECKS), default=list(CHECKS))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("error: no CUDA device visible; --allow-cpu runs the checks on the CPU", file=sys.stderr)
        return 2
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    files = make_smoke_files(workdir)
    failed = 0
    for name in args.checks:
        try:
            print(json.dumps({"check": name, "ok": True, **CHECKS[name](files, workdir)}), flush=True)
        except SmokeFailure as err:
            failed += 1
            print(json.dumps({"check": name, "ok": False, "error": str(err)}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
