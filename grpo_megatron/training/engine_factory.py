"""The rollout engine named by the config."""
from __future__ import annotations

import torch

from grpo_megatron.config import ConfigError, RunConfig
from grpo_megatron.rollout.base import RolloutEngine


def make_engine(cfg: RunConfig, dtype: torch.dtype) -> RolloutEngine:
    if cfg.rollout.engine == "embedded":
        from grpo_megatron.rollout.embedded import EmbeddedEngine

        return EmbeddedEngine(cfg.model.hf_path, dtype=dtype, seed=cfg.train.seed)
    if cfg.rollout.engine == "sglang":
        return _sglang_engine(cfg)
    raise ConfigError(f"rollout.engine={cfg.rollout.engine!r}: use embedded or sglang")


def _sglang_engine(cfg: RunConfig) -> RolloutEngine:
    from transformers import AutoConfig

    from grpo_megatron.rollout.sglang import RetryPolicy, SGLangEngine, ServerPool
    from grpo_megatron.rollout.sglang.sync_factory import make_probe, make_weight_sync, server_pool

    s = cfg.rollout.sglang
    if not s.urls:
        raise ConfigError("rollout.engine=sglang needs rollout.sglang.urls (e.g. [http://127.0.0.1:30000]): the servers "
                          "themselves, also behind a router (rollout.sglang.router_url), since weights are pushed "
                          "to each one")
    pool = server_pool(s)
    sync = make_weight_sync(s, cfg.model.hf_path, pool)
    hf = AutoConfig.from_pretrained(cfg.model.hf_path)
    topk = getattr(hf, "num_experts_per_tok", None)
    routed_shape = (hf.num_hidden_layers, topk) if topk else None
    probe = make_probe(s, cfg.model.hf_path)
    router = ServerPool([s.router_url], s.api_key, s.timeout_s, RetryPolicy(attempts=s.retries)) if s.router_url else None
    return SGLangEngine(pool, sync, s.max_in_flight, routed_shape, probe, s.gpu_servers, generate_pool=router,
                        partial_rollouts=cfg.rollout.partial_rollouts, weights_cpu_backup=s.weights_cpu_backup,
                        timeout_per_token_s=s.timeout_per_token_s)
