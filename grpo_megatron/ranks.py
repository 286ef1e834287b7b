"""Which process this is: the one place that answers "am I rank 0" and "are there several ranks".

Safe before torch.distributed is initialised (a single process is rank 0 of 1) and on any backend.
"""
from __future__ import annotations

import os

import torch.distributed as dist


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def multi_rank() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def launch_rank() -> int:
    """This process's rank as the launcher (torchrun, srun) set it, before or after torch.distributed starts."""
    return int(os.environ.get("RANK", "0"))
