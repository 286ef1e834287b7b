"""Building what the trainer uses from rollout/: the engine named by the config, this rank's share of colocated
weight sends, the SGLang teacher. training/ imports these and the interface in engines/base.py, never rollout.sglang."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from grpo_megatron.errors import ConfigError
from grpo_megatron.rollout.engines.base import BucketSender, RolloutEngine
from grpo_megatron.rollout.engines.embedded import EmbeddedEngine
from grpo_megatron.rollout.sglang import RetryPolicy, SGLangEngine, ServerPool
from grpo_megatron.rollout.sglang.health import HealthPolicy
from grpo_megatron.rollout.sglang.restarters import KeeperServers
from grpo_megatron.rollout.sglang.supervisor import RestartPolicy, ServerSupervisor
from grpo_megatron.rollout.sglang.sync_factory import make_probe, make_weight_sync, server_pool
from grpo_megatron.rollout.sglang.teacher import SGLangTeacher, TeacherScores
from grpo_megatron.rollout.sglang.weight_sync import bucket_bytes

if TYPE_CHECKING:  # the config schema sits above rollout/: a type only, never imported at run time
    from grpo_megatron.config import RolloutConfig

__all__ = ["SGLangTeacher", "TeacherScores", "bucket_bytes", "make_engine", "rank_sender"]


def make_engine(rollout: RolloutConfig, hf_path: str, seed: int, dtype: torch.dtype) -> RolloutEngine:
    """Rank 0's engine for the policy at `hf_path`: embedded (an HF model in this process, sampling seeded by
    `seed`) or SGLang servers over HTTP."""
    if rollout.engine == "embedded":
        return EmbeddedEngine(hf_path, dtype=dtype, seed=seed)
    if rollout.engine == "sglang":
        return _sglang_engine(rollout, hf_path)
    raise ConfigError(f"rollout.engine={rollout.engine!r}: use embedded or sglang")


def rank_sender(rollout: RolloutConfig, hf_path: str) -> BucketSender | None:
    """A rank other than 0 sends weights itself only to colocated tensor-mode servers (its own copy for the server
    TP rank on its GPU); None elsewhere."""
    s = rollout.sglang
    if rollout.engine == "sglang" and s.sync_mode == "tensor" and s.colocated:
        return make_weight_sync(s, hf_path)
    return None


def _sglang_engine(rollout: RolloutConfig, hf_path: str) -> RolloutEngine:
    from transformers import AutoConfig

    s = rollout.sglang
    if not s.urls:
        raise ConfigError("rollout.engine=sglang needs rollout.sglang.urls (e.g. [http://127.0.0.1:30000]): the servers "
                          "themselves, also behind a router (rollout.sglang.router_url), since weights are pushed "
                          "to each one")
    pool = server_pool(s)
    sync = make_weight_sync(s, hf_path, pool)
    hf = AutoConfig.from_pretrained(hf_path)
    topk = getattr(hf, "num_experts_per_tok", None)
    routed_shape = (hf.num_hidden_layers, topk) if topk else None
    probe = make_probe(s, hf_path)
    router = ServerPool([s.router_url], s.api_key, s.timeout_s, RetryPolicy(attempts=s.retries)) if s.router_url else None
    return SGLangEngine(pool, sync, s.max_in_flight, routed_shape, probe, s.gpu_servers, generate_pool=router,
                        partial_rollouts=rollout.partial_rollouts, weights_cpu_backup=s.weights_cpu_backup,
                        timeout_per_token_s=s.timeout_per_token_s, supervisor=_supervisor(s, pool))


def _supervisor(s, pool):
    """Health watching (off with health_interval_s: 0) and restarts of the keepers' servers in restart_dir."""
    if s.health_interval_s == 0:
        return None
    if s.max_restarts_per_server < 0 or s.max_restarts_per_hour < 0 or s.restart_timeout_s <= 0:
        raise ConfigError("rollout.sglang.max_restarts_per_server / max_restarts_per_hour must be >= 0 and "
                          "restart_timeout_s > 0")
    health = HealthPolicy(s.health_interval_s, s.health_timeout_s, s.health_slow_s)
    try:
        health.validate()
    except ValueError as err:
        raise ConfigError(str(err)) from None
    restarter = KeeperServers(s.restart_dir, s.api_key) if s.restart_dir else None
    return ServerSupervisor(pool, health, RestartPolicy(s.max_restarts_per_server, s.max_restarts_per_hour,
                                                        s.restart_timeout_s), restarter).start()
