"""Re-initialising megatron's model parallelism in one process (every trainer build does) frees the process
groups of the last initialisation: megatron's destroy_model_parallel only drops its references, and torch kept
each gloo group with its threads, ~50 threads per build, thousands over the test suite. And a trainer built after
another on the same layout keeps the groups in place: the first one's model holds its groups (and their threads)
for good (parallel.py, _MEGATRON_GROUPS)."""
from __future__ import annotations

import gc
import os

import pytest
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


def _trained_and_closed(make_config) -> None:
    from grpo_megatron.training.loop import Trainer

    trainer = Trainer(make_config(train={"steps": 1}))
    trainer.train_step()
    trainer.close()


@pytest.mark.integration
def test_trainers_built_one_after_another_keep_the_threads_level(make_config, dist_world1):
    _trained_and_closed(make_config)
    gc.collect()
    threads = _threads()
    _trained_and_closed(make_config)
    gc.collect()
    assert _threads() <= threads + 4  # new groups for the second trainer: +60 (20 gloo groups, 3 threads each)
