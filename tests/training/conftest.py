"""A tiny MoE model and a synthetic task, shared by the trainer tests."""
from __future__ import annotations

import pytest

from grpo_megatron.config import load_config


@pytest.fixture(scope="session")
def task_files(tmp_path_factory, tiny_hf_dir):
    from grpo_megatron.rollout.data.tasks import make_task_dataset

    root = tmp_path_factory.mktemp("task")
    return {
        "hf": tiny_hf_dir("qwen3_moe"),
        "train": make_task_dataset("first_digit", 200, 0, root / "train.jsonl"),
        "eval": make_task_dataset("first_digit", 16, 1, root / "eval.jsonl"),
    }


@pytest.fixture
def make_config(task_files, tmp_path):
    """make_config(**section_overrides) -> a validated RunConfig for a 1-3 step run in tmp_path."""
    def make(**overrides):
        base = {
            "run_dir": str(tmp_path / "run"),
            "model": {"hf_path": str(task_files["hf"])},
            "data": {"train_files": [str(task_files["train"])], "eval_files": [str(task_files["eval"])]},
            "rollout": {"prompts_per_step": 4, "group_size": 4, "max_new_tokens": 3},
            "reward": {"functions": [{"name": "first_digit"}]},
            "algorithm": {"loss": "gspo"},
            "train": {"steps": 2, "num_minibatches": 2, "micro_batch_size": 4, "lr": 1e-3, "num_threads": 1},
            "logging": {"progress_bar": False, "tensorboard": False},
            "eval": {"num_prompts": 8},
        }
        for section, values in overrides.items():
            if isinstance(values, dict):
                base[section] = {**base.get(section, {}), **values}
            else:
                base[section] = values
        return load_config(None, base)

    return make
