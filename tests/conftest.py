"""Shared test fixtures: locally made tiny checkpoints, a synthetic task with a trainer config over them, and a
one-process gloo world."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from grpo_megatron.config import load_config
from grpo_megatron.parallel import free_port
from tests import tiers

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """The test tiers' markers and their time report at the end of the run (tests/tiers.py)."""
    tiers.register(config)


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """Factory: tiny_hf_dir(family) -> a random-weight HF checkpoint of that family (made once)."""
    from grpo_megatron.models.tiny import make_tiny_hf_checkpoint

    root = tmp_path_factory.mktemp("tiny_hf")
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = make_tiny_hf_checkpoint(family, root / family, seed=0)
        return made[family]

    return get


@pytest.fixture(scope="session", autouse=True)
def share_cpu_tensors():
    """What the entry point does for weight_sync tensor (process_setup), for the trainers built in-process."""
    from grpo_megatron.process_setup import share_cpu_tensors_by_name

    share_cpu_tensors_by_name()


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


@pytest.fixture(scope="session")
def dist_world1():
    """torch.distributed with one gloo process, for in-process megatron tests."""
    from grpo_megatron.parallel import init_distributed

    init_distributed()
    yield


def run_cli(args: list[str], nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a repo script (under torchrun when nproc > 1) and capture its output."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for key in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={free_port()}", *args]
    else:
        cmd = [sys.executable, *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
