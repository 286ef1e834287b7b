"""The rollout engine named by the config."""
from __future__ import annotations

import torch

from grpo_megatron.config import ConfigError, RunConfig
from grpo_megatron.parallel import free_port
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

    from grpo_megatron.rollout.sglang import (
        DiskSync, DistributedSync, ProbeCheck, RetryPolicy, SGLangEngine, ServerPool, TensorSync,
    )

    s = cfg.rollout.sglang
    if not s.urls:
        raise ConfigError("rollout.engine=sglang needs rollout.sglang.urls (e.g. [http://127.0.0.1:30000]): the servers "
                          "themselves, also behind a router (rollout.sglang.router_url), since weights are pushed "
                          "to each one")
    pool = ServerPool(s.urls, s.api_key, s.timeout_s, RetryPolicy(attempts=s.retries))
    if s.weight_sync == "tensor":
        sync = TensorSync(pool, s.bucket_mb, s.server_tp_size)
    elif s.weight_sync == "distributed":
        backend = s.update_backend or ("nccl" if torch.cuda.is_available() else "gloo")
        sync = DistributedSync(pool, s.bucket_mb, s.server_tp_size, s.update_master_address,
                               s.update_master_port or free_port(), backend)
    elif s.weight_sync == "disk":
        sync = DiskSync(pool, s.bucket_mb, cfg.model.hf_path, s.disk_dir or None)
    else:
        raise ConfigError(f"rollout.sglang.weight_sync={s.weight_sync!r}: use tensor, distributed or disk")
    hf = AutoConfig.from_pretrained(cfg.model.hf_path)
    topk = getattr(hf, "num_experts_per_tok", None)
    routed_shape = (hf.num_hidden_layers, topk) if topk else None
    probe = (ProbeCheck(cfg.model.hf_path, list(range(1, s.probe_tokens + 1)), s.probe_tolerance)
             if s.probe_tokens > 1 else None)
    router = ServerPool([s.router_url], s.api_key, s.timeout_s, RetryPolicy(attempts=s.retries)) if s.router_url else None
    return SGLangEngine(pool, sync, s.max_in_flight, routed_shape, probe, s.gpu_servers, generate_pool=router)
