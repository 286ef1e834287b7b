"""The weight sync and probe a config asks for, with the placements that cannot work refused up front."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from grpo_megatron.errors import ConfigError
from grpo_megatron.parallel import free_port
from grpo_megatron.rollout.sglang.probe import ProbeCheck
from grpo_megatron.rollout.sglang.transport import RetryPolicy, ServerPool
from grpo_megatron.rollout.sglang.disk_sync import DiskSync
from grpo_megatron.rollout.sglang.distributed_sync import DistributedSync
from grpo_megatron.rollout.sglang.tensor_sync import TensorSync
from grpo_megatron.rollout.sglang.weight_sync import WeightSync

if TYPE_CHECKING:  # the config schema sits above rollout/: a type only, never imported at run time
    from grpo_megatron.config import SGLangConfig

logger = logging.getLogger(__name__)


def server_pool(s: SGLangConfig) -> ServerPool:
    return ServerPool(s.urls, s.api_key, s.timeout_s, RetryPolicy(attempts=s.retries))


def make_weight_sync(s: SGLangConfig, hf_path: str, pool: ServerPool | None = None) -> WeightSync:
    """rollout.sglang.weight_sync as configured; a placement it cannot serve is a ConfigError naming the fix."""
    pool = pool or server_pool(s)
    if s.server_tp_size < 1:
        raise ConfigError(f"rollout.sglang.server_tp_size={s.server_tp_size}: the servers' --tp-size, >= 1")
    try:
        mode = s.sync_mode
        if mode == "tensor":
            return TensorSync(pool, s.bucket_mb, s.server_tp_size, s.colocated)
        if mode == "distributed":
            backend = s.update_backend or ("nccl" if torch.cuda.is_available() else "gloo")
            if s.colocated and backend == "nccl":
                raise ConfigError("rollout.sglang.weight_sync=distributed with colocated servers puts trainer rank 0 "
                                  "and a server rank on one GPU in one NCCL group (NCCL: Duplicate GPU detected); "
                                  "use weight_sync: tensor for colocated servers")
            return DistributedSync(pool, s.bucket_mb, s.server_tp_size, s.update_master_address,
                                   s.update_master_port or free_port(), backend)
        if mode == "disk":
            return DiskSync(pool, s.bucket_mb, hf_path, s.disk_dir or None, s.disk_load_timeout_s)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    raise ConfigError(f"rollout.sglang.weight_sync={s.weight_sync!r}: use tensor, distributed, disk or auto")


def make_probe(s: SGLangConfig, hf_path: str) -> ProbeCheck | None:
    """The post-sync probe, or None: off when probe_tokens < 2, and for GPU servers unless asked for."""
    if s.probe_tokens < 2:
        return None
    if s.gpu_servers and not s.probe_on_gpu_servers:
        logger.info("post-sync probe off for GPU servers (it holds an fp32 model copy on rank 0's CPU); "
                    "rollout.sglang.probe_on_gpu_servers: true turns it on")
        return None
    return ProbeCheck(hf_path, list(range(1, s.probe_tokens + 1)), s.probe_tolerance)
