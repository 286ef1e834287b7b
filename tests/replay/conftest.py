"""Trainer fixtures shared with tests/training (a tiny Qwen3-MoE and a synthetic task)."""
from tests.training.conftest import make_config, task_files  # noqa: F401
