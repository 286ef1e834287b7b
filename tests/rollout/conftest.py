"""Tiny random HF checkpoints shared by the rollout tests (written once per session, never from a hub)."""
from __future__ import annotations

from pathlib import Path

import pytest

from grpo_megatron.models.tiny import make_tiny_hf_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """family -> checkpoint directory, made on first use."""
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = make_tiny_hf_checkpoint(family, tmp_path_factory.mktemp(family), seed=0)
        return made[family]

    return get
