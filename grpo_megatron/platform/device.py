"""Which device the run has (CUDA or CPU), and the few device operations the rest of the project needs."""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Platform:
    """What the run has: device kind, the torch.distributed backend, and the optional GPU extras."""

    device_type: str  # "cuda" or "cpu"
    backend: str  # "nccl" or "gloo"
    has_transformer_engine: bool
    has_apex: bool

    @property
    def device(self) -> torch.device:
        if self.device_type == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def has_cuda() -> bool:
    return torch.cuda.is_available()


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except Exception:  # ImportError, or a broken CUDA extension on a CPU machine
        return False


@functools.lru_cache(maxsize=1)
def detect() -> Platform:
    cuda = has_cuda()
    te = cuda and _importable("transformer_engine.pytorch")
    apex = cuda and _importable("apex.optimizers")
    return Platform("cuda" if cuda else "cpu", "nccl" if cuda else "gloo", te, apex)


def device() -> torch.device:
    """Where model inputs and the tensors of the default group's collectives live (NCCL has no CPU backend)."""
    return detect().device


def use_distributed_optimizer(requested: bool | None, data_parallel_size: int) -> bool:
    """Shard fp32 main parameters and Adam state over data-parallel ranks (megatron's distributed optimizer)?

    `requested` None means: on GPUs whenever DP > 1 (replicating ~16 bytes per parameter on every rank is what
    runs a 30B model out of memory); off on CPU, where memory is not the limit and gloo's reduce-scatter is a
    slow emulation. An explicit True/False wins everywhere.
    """
    if requested is not None:
        return requested
    return detect().device_type == "cuda" and data_parallel_size > 1


def empty_cache() -> None:
    if has_cuda():
        torch.cuda.empty_cache()


def synchronize() -> None:
    """Wait for queued GPU work (kernels run asynchronously: host timings need it); no-op on CPU."""
    if has_cuda():
        torch.cuda.synchronize()


def peak_memory_bytes() -> int:
    """Peak device memory on GPU; peak RSS of the process on CPU."""
    if has_cuda():
        return torch.cuda.max_memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
