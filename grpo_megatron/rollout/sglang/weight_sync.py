"""Pushing the trainer's weights, as buckets (grpo_megatron.models.weight_stream), to SGLang servers: the
envelope every mode shares and the bucket pipelining. The modes are tensor_sync.py, distributed_sync.py and
disk_sync.py.

Every mode runs the same envelope on each server: `/begin_weight_update`, the mode's transfer (the last request
carries `weight_version` and `flush_cache: true`, so the server drops the KV cache of the old weights as it applies
them; a separate `/flush_cache` call cost ~0.45 s per sync on SGLang 0.5.23, in-request ~0), `/end_weight_update`.
SGLang rejects tensor and distributed updates outside begin/end with HTTP 400; servers that predate the session
routes answer 404 to begin, and then the envelope is skipped for them (logged once).
A bucket is sent while the next is assembled (one worker thread), so a sender holds at most two buckets; on CPU
those two buffers are kept and refilled from bucket to bucket and sync to sync (ReusedBuffers).
Tensor and distributed updates may carry any subset of the checkpoint's tensors (sync_changed_only): SGLang 0.5.23's
`load_weights` (e.g. models/qwen3_moe.py) writes each named tensor into its slice of the fused parameter on its own
(q/k/v_proj -> qkv_proj shard "q"/"k"/"v", gate/up_proj -> gate_up_proj shard 0/1, experts.E.* -> FusedMoE w13/w2
of expert E) and checks no completeness, and `end_weight_update`'s post-processing runs over the whole model.
"""
from __future__ import annotations

import logging
import socket
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from urllib.parse import urlparse

import torch
import torch.distributed as dist

from grpo_megatron.models.weight_stream import Alloc, Bucket, pack, plain_alloc
from grpo_megatron.ranks import is_rank0, multi_rank
from grpo_megatron.rollout.sglang.errors import ServerRequestError
from grpo_megatron.rollout.sglang.transport import ServerPool

logger = logging.getLogger(__name__)

NamedTensors = Iterable[tuple[str, torch.Tensor]]


def bucket_bytes(bucket_mb: float) -> int:
    if not bucket_mb > 0:
        raise ValueError(f"rollout.sglang.bucket_mb={bucket_mb}: must be > 0 (512 is the default)")
    return max(1, int(bucket_mb * 2**20))  # a fraction of a MiB splits small test models


def is_local_host(url: str) -> bool:
    """Whether the server at `url` runs on this host (loopback, this host's name, or one of its addresses)."""
    host = urlparse(url).hostname or ""
    if host in ("localhost", socket.gethostname(), socket.getfqdn()) or host.startswith("127."):
        return True
    try:
        local = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
        return socket.gethostbyname(host) in local
    except OSError:
        return False


def reachable_address(url: str) -> str:
    """This host's address on the route to the server at `url` (what the server can connect back to)."""
    host = urlparse(url).hostname or "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((socket.gethostbyname(host), urlparse(url).port or 80))  # UDP: no packet is sent
        return probe.getsockname()[0]


class Pipelined:
    """Runs `send(bucket)` in one worker thread while the caller assembles the next bucket.

    `submit` waits for the previous send first, so at most one bucket is in flight and one being filled.
    """

    def __init__(self, send: Callable[[Bucket], None]):
        self.send = send
        self._executor = ThreadPoolExecutor(1)
        self._pending: Future | None = None

    def wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def submit(self, bucket: Bucket) -> None:
        self.wait()
        self._pending = self._executor.submit(self._run, [bucket])

    def _run(self, box: list) -> None:
        """Send and drop the bucket before the future completes (the executor keeps its arguments a bit
        longer, which would let a third bucket exist)."""
        self.send(box.pop())

    def __enter__(self) -> "Pipelined":
        return self

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None:
                self.wait()
        finally:
            self._executor.shutdown(wait=True)


class ReusedBuffers:
    """An Alloc that hands out two CPU buffers in turn and keeps them until `release` (GPU buffers: fresh ones).

    Writing a fresh buffer costs its page faults: making and filling a 108 MB shared-memory bucket took 0.2 s
    here, refilling one already touched 0.01 s, which was most of the CPU tensor mode's time. Two are enough
    because a stream allocates bucket k+1 only after handing bucket k over, and `Pipelined.submit(k)` returns only
    once the send of bucket k-1 (the other buffer) has returned. Not for colocated sends, whose ranks give their
    buffers to the server without waiting. On GPU the sender's buffers are left to be freed between syncs, so
    training keeps that memory.
    """

    def __init__(self, make: Alloc, slots: int = 2):
        self.make = make
        self._buffers: list[torch.Tensor | None] = [None] * slots
        self._next = 0

    def __call__(self, nbytes: int, device: torch.device) -> torch.Tensor:
        if device.type != "cpu":
            return self.make(nbytes, device)
        slot, self._next = self._next, (self._next + 1) % len(self._buffers)
        buffer = self._buffers[slot]
        if buffer is None or buffer.numel() < nbytes:
            self._buffers[slot] = None  # the old one goes before the larger one is made
            buffer = self._buffers[slot] = self.make(nbytes, device)
        return buffer[:nbytes]

    def release(self) -> None:
        self._buffers = [None] * len(self._buffers)
        self._next = 0


class WeightSync(ABC):
    """One way of moving weights; the push methods return the bytes moved (per server copy).

    `to_every_rank`: every trainer rank must receive each bucket (colocated tensor mode), else rank 0 only.
    `alloc`: where a bucket's buffer lives (shared memory for tensor mode on CPU).
    """

    to_every_rank = False

    def __init__(self, pool: ServerPool, bucket_mb: float, alloc: Alloc = plain_alloc):
        self.pool = pool
        self.bucket_bytes = bucket_bytes(bucket_mb)
        self.alloc: Alloc = ReusedBuffers(alloc)
        self._sessionless: set[str] = set()

    def push(self, named_tensors: NamedTensors, version: int) -> int:
        """Push a list of full tensors (one process): packed into buckets here."""
        return self.push_buckets(pack(named_tensors, self.bucket_bytes, self.alloc), version)

    def push_buckets(self, buckets: Iterable[Bucket], version: int) -> int:
        """The session envelope around the transfer; called on rank 0 (on every rank when `to_every_rank`)."""
        leading = is_rank0()
        if leading:
            for url in self.pool.urls:
                self._begin(url)
        moved = self.transfer(buckets, str(version))
        if self.to_every_rank and multi_rank():
            from grpo_megatron.parallel import control_group

            dist.barrier(group=control_group())  # every rank's requests done before the session ends
        if leading:
            for url in self.pool.urls:
                if url not in self._sessionless:
                    self.pool.call(url, "POST", "/end_weight_update", {})
        return moved

    @abstractmethod
    def transfer(self, buckets: Iterable[Bucket], version: str) -> int:
        """Send all buckets to every server; the last request carries `version` and flushes the cache."""

    def close(self) -> None:
        """Release what the mode holds (process group, files, bucket buffers)."""
        if isinstance(self.alloc, ReusedBuffers):
            self.alloc.release()

    def _begin(self, url: str) -> None:
        try:
            self.pool.call(url, "POST", "/begin_weight_update", {})
        except ServerRequestError as err:
            if "HTTP 404" not in str(err):
                raise
            if url not in self._sessionless:
                logger.info("%s has no /begin_weight_update (older SGLang); updating without a session", url)
            self._sessionless.add(url)

    def _post_all(self, path: str, payloads: dict[str, dict], retry: bool = True,
                  timeout_s: float | None = None) -> None:
        """One request per server, concurrently (url -> payload)."""
        with ThreadPoolExecutor(len(payloads)) as executor:
            calls = [executor.submit(self.pool.call, url, "POST", path, payload, timeout_s, retry)
                     for url, payload in payloads.items()]
            for call in calls:
                call.result()


def bucket_fields(last: bool, version: str) -> dict:
    """Request fields of a bucket: the last one sets the weight version and flushes the server's cache."""
    return {"weight_version": version, "flush_cache": True} if last else {"flush_cache": False}
