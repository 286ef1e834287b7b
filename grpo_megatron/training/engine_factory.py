"""The rollout engine named by the config."""
from __future__ import annotations

import torch

from grpo_megatron.config import ConfigError, RunConfig
from grpo_megatron.rollout.base import RolloutEngine


def make_engine(cfg: RunConfig, dtype: torch.dtype) -> RolloutEngine:
    if cfg.rollout.engine == "embedded":
        from grpo_megatron.rollout.embedded import EmbeddedEngine

        return EmbeddedEngine(cfg.model.hf_path, dtype=dtype, seed=cfg.train.seed)
    raise ConfigError(f"rollout.engine={cfg.rollout.engine!r} has no client in this version; "
                      "use rollout.engine: embedded")
