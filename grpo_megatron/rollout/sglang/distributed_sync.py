"""Distributed mode: `/init_weights_update_group` once (rank 0 of the trainer and every TP rank of every server),
then per bucket `/update_weights_from_distributed` with `load_format: flattened_bucket` while rank 0 broadcasts
the bucket's bytes in one call (gloo on CPU, NCCL on GPU).
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist

from grpo_megatron.models.weight_stream import Bucket
from grpo_megatron.rollout.sglang.errors import ServerRequestError
from grpo_megatron.rollout.sglang.transport import ServerPool
from grpo_megatron.rollout.sglang.update_group import join_update_group
from grpo_megatron.rollout.sglang.weight_sync import Pipelined, WeightSync, bucket_fields, reachable_address

logger = logging.getLogger(__name__)
GROUP_NAME = "grpo_weight_update"


class DistributedSync(WeightSync):
    """Rank 0 of the trainer broadcasts to every TP rank of every server: world 1 + servers x tp_size.

    Not with colocated NCCL servers: trainer rank 0 and a server rank would share a GPU in one NCCL group
    (NCCL refuses: "Duplicate GPU detected"); the factory refuses that combination.
    """

    def __init__(self, pool: ServerPool, bucket_mb: float, tp_size: int, master_address: str, master_port: int,
                 backend: str):
        super().__init__(pool, bucket_mb)
        self.tp_size = tp_size
        self.master_address = master_address or reachable_address(pool.urls[0])
        self.master_port, self.backend = master_port, backend
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self._group = None
        self._store = None
        self._members: list[str] = []

    def transfer(self, buckets: Iterable[Bucket], version: str) -> int:
        if self._group is not None and self._members != self.pool.urls:
            self._regroup()
        if self._group is None:
            self._members = list(self.pool.urls)
            self._group = self._init_group()
        moved = 0

        def send(bucket: Bucket) -> None:
            payload = {"names": bucket.names, "dtypes": [str(d).removeprefix("torch.") for d in bucket.dtypes],
                       "shapes": [list(s) for s in bucket.shapes], "group_name": GROUP_NAME,
                       "load_format": "flattened_bucket", **bucket_fields(bucket.last, version)}
            with ThreadPoolExecutor(len(self.pool.urls)) as executor:
                calls = [executor.submit(self.pool.call, url, "POST", "/update_weights_from_distributed", payload,
                                         None, False) for url in self.pool.urls]
                dist.broadcast(bucket.flat.to(self.device), src=0, group=self._group)
                for call in calls:
                    call.result()

        with Pipelined(send) as pipe:
            for bucket in buckets:
                pipe.submit(bucket)
                moved += bucket.nbytes
        return moved

    def group_ranks(self) -> dict[str, int]:
        """Each server's rank_offset: rank 0 is the trainer, then every server's TP ranks in URL order."""
        return {url: 1 + i * self.tp_size for i, url in enumerate(self.pool.urls)}

    def _init_group(self):
        world_size = 1 + self.tp_size * len(self.pool.urls)
        with ThreadPoolExecutor(len(self.pool.urls)) as executor:
            calls = [executor.submit(self.pool.call, url, "POST", "/init_weights_update_group", {
                "master_address": self.master_address, "master_port": self.master_port,
                "rank_offset": offset, "world_size": world_size, "group_name": GROUP_NAME,
                "backend": self.backend}, None, False) for url, offset in self.group_ranks().items()]
            group, self._store = join_update_group(self.master_address, self.master_port, world_size, GROUP_NAME,
                                                   self.backend, self.pool.timeout_s)
            for call in calls:
                call.result()
        return group

    def _regroup(self) -> None:
        """A server left or rejoined the push targets (supervisor.py): the group is made again over the current
        ones, on a fresh port. Every one leaves the old group first (SGLang 0.5.23 cannot init a group name it
        holds; a restarted server holds none and answers "does not exist")."""
        from grpo_megatron.parallel import free_port

        logger.info("weight-update group: servers changed (%d -> %d); making a new group", len(self._members),
                    len(self.pool.urls))
        for url in self.pool.urls:
            try:
                self.pool.call(url, "POST", "/destroy_weights_update_group", {"group_name": GROUP_NAME})
            except ServerRequestError as err:
                logger.info("%s: %s", url, err)
        dist.destroy_process_group(self._group)
        self._group = self._store = None
        self.master_port = free_port()

    def close(self) -> None:
        super().close()
        if self._group is not None:
            for url in self.pool.urls:
                self.pool.call(url, "POST", "/destroy_weights_update_group", {"group_name": GROUP_NAME})
            dist.destroy_process_group(self._group)
            self._group = self._store = None
