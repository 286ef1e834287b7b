"""Tensor mode: `/update_weights_from_tensor`, the bucket's tensors pickled by torch's ForkingPickler (CUDA IPC on
GPU, shared memory on CPU), one pickle per server TP rank. Colocated, each trainer rank pickles its own copy for
the server TP rank on its GPU and the server's first rank posts them together; otherwise every server must be on
this host.
"""
from __future__ import annotations

import base64
import io
import logging
from collections.abc import Iterable
from multiprocessing.reduction import ForkingPickler

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from grpo_megatron.models.weight_stream import Bucket
from grpo_megatron.ranks import world_size
from grpo_megatron.rollout.sglang.transport import ServerPool
from grpo_megatron.rollout.sglang.weight_sync import Pipelined, WeightSync, bucket_fields, is_local_host

logger = logging.getLogger(__name__)


def _shared_alloc(nbytes: int, device: torch.device) -> torch.Tensor:
    """A bucket buffer the server can map: shared memory on CPU (GPU memory travels as a CUDA IPC handle)."""
    flat = torch.empty(nbytes, dtype=torch.uint8, device=device)
    if flat.device.type == "cpu":
        for attempt in range(3):  # the shm daemon may miss its 1 s deadline under load; the share is idempotent
            try:
                flat.share_memory_()
                break
            except RuntimeError as err:
                if "Shared memory manager" not in str(err) or attempt == 2:
                    raise
                logger.warning("retrying a shared-memory allocation for the weight sync: %s", err)
    return flat


class TensorSync(WeightSync):
    """Colocated (`colocated`, several trainer ranks): server i's TP rank j is trainer rank i * tp_size + j."""

    def __init__(self, pool: ServerPool, bucket_mb: float, tp_size: int, colocated: bool = False):
        super().__init__(pool, bucket_mb, _shared_alloc)
        self.tp_size = tp_size
        world = world_size()
        self.to_every_rank = colocated and world > 1
        if self.to_every_rank:
            self.alloc = _shared_alloc  # each rank's pickle outlives its turn (see _transfer_colocated)
        if self.to_every_rank and world != len(pool.urls) * tp_size:
            raise ValueError(f"colocated tensor weight sync maps server TP ranks onto trainer ranks: "
                             f"{len(pool.urls)} server(s) x rollout.sglang.server_tp_size={tp_size} must equal the "
                             f"trainer's {world} ranks; fix server_tp_size or the server count")
        if not self.to_every_rank:
            remote = [u for u in pool.urls if not is_local_host(u)]
            if remote:
                raise ValueError(f"rollout.sglang.weight_sync=tensor shares memory with the servers, but {remote[0]} "
                                 f"is not on this host: set rollout.sglang.colocated=true with one server per "
                                 f"server_tp_size trainer ranks, or use weight_sync: distributed or disk")
        self._groups: dict[int, object] = {}
        if mp.get_sharing_strategy() != "file_system" and not torch.cuda.is_available():
            raise RuntimeError("weight_sync tensor shares CPU tensors by name: call "
                               "grpo_megatron.process_setup.share_cpu_tensors_by_name() at start-up")

    def transfer(self, buckets: Iterable[Bucket], version: str) -> int:
        if self.to_every_rank:
            return self._transfer_colocated(buckets, version)
        moved = 0

        def send(bucket: Bucket) -> None:
            views, fields = bucket.tensors(), bucket_fields(bucket.last, version)
            # a pickle per server and TP rank: see _pickle
            self._post_all("/update_weights_from_tensor", {url: {
                "serialized_named_tensors": [_pickle(views) for _ in range(self.tp_size)], **fields}
                for url in self.pool.urls})

        with Pipelined(send) as pipe:
            for bucket in buckets:
                pipe.submit(bucket)
                moved += bucket.nbytes
        return moved

    def _transfer_colocated(self, buckets: Iterable[Bucket], version: str) -> int:
        """Each rank pickles its own copy; the server's first rank gathers its TP ranks' pickles and posts.

        A pickle holds a reference on its buffer until the server rank unpickles it (shm refcount, CUDA IPC ref
        counter), so a rank may drop its bucket at once; the first rank joins the gather of bucket k+1 only
        after the request of bucket k returned, so a rank's buffers awaiting the server are at most two.
        """
        rank = dist.get_rank()
        server, first = rank // self.tp_size, rank // self.tp_size * self.tp_size
        group = self._server_group(server)
        url = self.pool.urls[server]
        moved = 0

        def send(item: tuple[list[str], bool]) -> None:
            pickles, last = item
            self.pool.call(url, "POST", "/update_weights_from_tensor",
                           {"serialized_named_tensors": pickles, **bucket_fields(last, version)})

        with Pipelined(send) as pipe:
            for bucket in buckets:
                mine = _pickle(bucket.tensors())
                if rank == first:
                    pipe.wait()
                pickles: list | None = [None] * self.tp_size if rank == first else None
                if group is None:
                    pickles = [mine]
                else:
                    dist.gather_object(mine, pickles, dst=first, group=group)
                if rank == first:
                    pipe.submit((pickles, bucket.last))
                moved += bucket.nbytes
        return moved

    def _server_group(self, server: int):
        """A gloo group of each server's trainer ranks (built once, on every rank); None for TP 1."""
        if self.tp_size == 1:
            return None
        if not self._groups:
            for i in range(len(self.pool.urls)):
                self._groups[i] = dist.new_group(list(range(i * self.tp_size, (i + 1) * self.tp_size)),
                                                 backend="gloo")
        return self._groups[server]


def _pickle(views: list[tuple[str, torch.Tensor]]) -> str:
    """What SGLang's MultiprocessingSerializer.serialize(..., output_str=True) produces; one per receiving rank.

    A pickling takes one reference on the shared storage (shm refcount on CPU, CUDA IPC ref counter on GPU) and
    the rank that unpickles it drops one, so ranks sharing a pickle release the buffer early: a second server
    then fails to open it ("unable to open shared memory object"), a GPU one may read freed memory
    (sglang tp_worker.deserialize_own_rank: each TP rank reads only its own entry).
    """
    buffer = io.BytesIO()
    ForkingPickler(buffer).dump(views)
    return base64.b64encode(buffer.getvalue()).decode("utf-8")
