"""The trainer's side of SGLang's weight-update process group (rank 0; the servers' ranks follow).

SGLang's `/init_weights_update_group` builds its group with a TCP rendezvous at master_address:master_port,
a PrefixStore named after the group, and torch's `_new_process_group_helper` (sglang `init_custom_process_group`).
The trainer must build the same store layout, so it goes through the same torch helper; the group is kept
out of torch's default world so it does not disturb the trainer's own process groups.
"""
from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist
from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world


def join_update_group(master_address: str, master_port: int, world_size: int, group_name: str,
                      backend: str, timeout_s: float) -> tuple[dist.ProcessGroup, dist.TCPStore]:
    """Become rank 0 of the group; blocks until every server rank has joined (their HTTP calls in flight).

    The store is returned because it must outlive the group.
    """
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(master_address, master_port, world_size, is_master=True, timeout=timeout)
    group, _ = _new_process_group_helper(world_size, 0, [], Backend(backend), PrefixStore(group_name, store),
                                         group_name=group_name, timeout=timeout)
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group, store
