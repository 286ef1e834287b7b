"""Re-initialising megatron's model parallelism in one process (every trainer build does) frees the process
groups of the last initialisation: megatron's destroy_model_parallel only drops its references, and torch kept
each gloo group with its threads, ~50 threads per build, thousands over the test suite."""
from __future__ import annotations

import os

import torch.distributed as dist

from grpo_megatron.parallel import ParallelLayout, init_distributed, init_model_parallel


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_reinitialising_model_parallel_leaves_no_groups_or_threads_behind():
    init_distributed()
    init_model_parallel(ParallelLayout())
    groups, threads = len(dist.distributed_c10d._world.pg_map), _threads()
    for _ in range(3):
        init_model_parallel(ParallelLayout())
    assert len(dist.distributed_c10d._world.pg_map) == groups
    assert _threads() <= threads + 2  # a pool thread may come and go; a leak is ~50 per build
