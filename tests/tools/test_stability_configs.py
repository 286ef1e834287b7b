"""The stability study's configs stay valid and comparable: every arm trains two real steps (tiny MoE)."""
from __future__ import annotations

import json

import pytest
import yaml

from grpo_megatron.config import load_config
from tests.conftest import REPO

STUDY = REPO / "examples" / "stability"
ARMS = {"grpo": ("grpo", "none"), "grpo_r2": ("grpo", "r2"), "grpo_r3": ("grpo", "r3"), "gspo": ("gspo", "none")}


@pytest.mark.parametrize("scale", ["cpu", "gpu"])
def test_arms_differ_only_in_the_algorithm(scale):
    """Same model, data, seed, batch shape and steps (so the same token budget) in every arm of a scale."""
    configs = {arm: yaml.safe_load((STUDY / scale / f"{arm}.yaml").read_text()) for arm in ARMS}
    shared = {arm: {k: v for k, v in c.items() if k not in ("algorithm", "run_dir")} for arm, c in configs.items()}
    assert all(s == shared["grpo"] for s in shared.values())
    for arm, (loss, replay) in ARMS.items():
        algorithm = load_config(STUDY / scale / f"{arm}.yaml").algorithm
        assert (algorithm.loss, algorithm.routing_replay) == (loss, replay)
        assert (algorithm.clip_low, algorithm.clip_high) == ((3e-4, 4e-4) if loss == "gspo" else (0.2, 0.2))


@pytest.fixture(scope="module")
def copy_task(tmp_path_factory, tiny_hf_dir):
    from grpo_megatron.rollout.data.tasks import make_task_dataset

    root = tmp_path_factory.mktemp("copy_task")
    return {"hf": tiny_hf_dir("qwen3_moe"), "train": make_task_dataset("copy", 64, 0, root / "train.jsonl"),
            "eval": make_task_dataset("copy", 8, 1, root / "eval.jsonl")}


@pytest.mark.parametrize("arm", list(ARMS))
def test_cpu_arm_trains_two_steps(arm, copy_task, tmp_path, dist_world1):
    from grpo_megatron.training.loop import Trainer

    run_dir = tmp_path / arm
    cfg = load_config(STUDY / "cpu" / f"{arm}.yaml", {
        "run_dir": str(run_dir),
        "model": {"hf_path": str(copy_task["hf"]), "megatron_path": None},
        "data": {"train_files": [str(copy_task["train"])], "eval_files": [str(copy_task["eval"])]},
        "rollout": {"prompts_per_step": 4, "group_size": 4, "max_new_tokens": 3},
        "train": {"steps": 2, "sft_warmup_steps": 1, "lr_warmup_steps": 0, "micro_batch_size": 4},
        "eval": {"num_prompts": 4, "interval": 0},
    })
    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train/clip_frac_tokens" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all("routing/agree_old_current" in r for r in steps)
    if ARMS[arm][1] == "r3":
        assert steps[0]["routing/agree_rollout_train"] == 1.0
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["algorithm"]["routing_replay"] == ARMS[arm][1]


def test_study_script_parses():
    import subprocess

    assert subprocess.run(["bash", "-n", str(STUDY / "run_cpu_study.sh")]).returncode == 0
    assert subprocess.run(["bash", "-n", str(STUDY / "common.sh")]).returncode == 0


V2_ARMS = {  # study v2 (real SGLang rollouts in bf16): arm -> (loss, replay, correction mode, correction level)
    "grpo": ("grpo", "none", "none", "token"), "grpo_r2": ("grpo", "r2", "none", "token"),
    "grpo_r3": ("grpo", "r3", "none", "token"), "grpo_tis": ("grpo", "none", "tis", "token"),
    "gspo": ("gspo", "none", "none", "token"), "gspo_seqcorr": ("gspo", "none", "tis", "sequence"),
}


def test_sglang_study_arms_differ_only_in_the_algorithm():
    """v2: the same shared sections in all six arms, rollouts from an SGLang server, and each arm's algorithm."""
    configs = {arm: yaml.safe_load((STUDY / "cpu_sglang" / f"{arm}.yaml").read_text()) for arm in V2_ARMS}
    shared = {arm: {k: v for k, v in c.items() if k not in ("algorithm", "run_dir")} for arm, c in configs.items()}
    assert all(s == shared["grpo"] for s in shared.values())
    v1 = yaml.safe_load((STUDY / "cpu" / "grpo.yaml").read_text())
    assert shared["grpo"]["model"] == v1["model"] and shared["grpo"]["data"] == v1["data"]
    for arm, (loss, replay, mode, level) in V2_ARMS.items():
        cfg = load_config(STUDY / "cpu_sglang" / f"{arm}.yaml")
        assert cfg.rollout.engine == "sglang" and cfg.rollout.sglang.weight_sync == "tensor"
        assert not cfg.rollout.use_engine_logprobs  # decoupled: the correction needs the trainer's old log-probs
        assert (cfg.algorithm.loss, cfg.algorithm.routing_replay) == (loss, replay)
        assert (cfg.algorithm.rollout_correction.mode, cfg.algorithm.rollout_correction.level) == (mode, level)
        assert (cfg.algorithm.clip_low, cfg.algorithm.clip_high) == ((3e-4, 4e-4) if loss == "gspo" else (0.2, 0.2))


def test_sglang_study_script_parses():
    import subprocess

    assert subprocess.run(["bash", "-n", str(STUDY / "run_cpu_sglang_study.sh")]).returncode == 0
