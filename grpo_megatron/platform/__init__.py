"""The one place that knows whether we run on CUDA or on CPU, and which megatron-core fixes the run needs.

Grouped by purpose: `device` (detection and device operations), `megatron_version` (the tested range and
its start-up check), `without_te` (fixes for megatron-core's local layer spec, on any device without
TransformerEngine) and `cpu_shims` (CPU only). Call :func:`setup_platform` once at start-up, before building
models; nothing is patched at import time.
"""
from __future__ import annotations

import logging

import torch

from grpo_megatron.platform.cpu_shims import apply_cpu_shims, cpu_shims_applied
from grpo_megatron.platform.device import (
    Platform, detect, device, empty_cache, has_cuda, peak_memory_bytes, synchronize, use_distributed_optimizer)
from grpo_megatron.platform.megatron_version import (
    TESTED_MEGATRON_VERSIONS, UnsupportedMegatronError, check_megatron_version)
from grpo_megatron.platform.without_te import apply_without_te_fixes

logger = logging.getLogger(__name__)

__all__ = [
    "Platform", "TESTED_MEGATRON_VERSIONS", "UnsupportedMegatronError", "apply_cpu_shims", "check_megatron_version",
    "cpu_shims_applied", "detect", "device", "empty_cache", "has_cuda", "peak_memory_bytes", "setup_platform",
    "synchronize", "use_distributed_optimizer",
]


def setup_platform(local_rank: int = 0, num_threads: int | None = None) -> Platform:
    """Check megatron-core's version, select this process's device and apply the fixes it needs.

    GPU with TransformerEngine: nothing is patched. GPU without TE: the local-spec fixes. CPU: those and
    the CPU shims.
    """
    check_megatron_version()
    platform = detect()
    if platform.device_type == "cuda":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        if not platform.has_transformer_engine:
            logger.warning("TransformerEngine not importable: using megatron-core's local layer spec "
                           "(slower; install the 'gpu' extra for TE kernels)")
    else:
        apply_cpu_shims()
    if not platform.has_transformer_engine:
        apply_without_te_fixes()
    if num_threads:
        torch.set_num_threads(num_threads)
    return platform
