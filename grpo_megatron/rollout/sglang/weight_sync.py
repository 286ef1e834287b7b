"""Pushing the trainer's weights, as buckets (grpo_megatron.models.weight_stream), to SGLang servers.

Every mode runs the same envelope on each server: `/begin_weight_update`, the mode's transfer (the last request
carries `weight_version` and `flush_cache: true`, so the server drops the KV cache of the old weights as it applies
them; a separate `/flush_cache` call cost ~0.45 s per sync on SGLang 0.5.23, in-request ~0), `/end_weight_update`.
SGLang rejects tensor and distributed updates outside begin/end with HTTP 400; servers that predate the session
routes answer 404 to begin, and then the envelope is skipped for them (logged once).
A bucket is sent while the next is assembled (one worker thread), so a sender holds at most two buckets; on CPU
those two buffers are kept and refilled from bucket to bucket and sync to sync (ReusedBuffers).
- tensor: `/update_weights_from_tensor`, the bucket's tensors pickled by torch's ForkingPickler (CUDA IPC on GPU,
  shared memory on CPU), one pickle per server TP rank. Colocated, each trainer rank pickles its own copy for the
  server TP rank on its GPU and the server's first rank posts them together; otherwise every server must be on
  this host.
- distributed: `/init_weights_update_group` once (rank 0 of the trainer and every TP rank of every server), then
  per bucket `/update_weights_from_distributed` with `load_format: flattened_bucket` while rank 0 broadcasts the
  bucket's bytes in one call (gloo on CPU, NCCL on GPU).
- disk: the bucket bytes written as safetensors shards under `disk_dir` (a staging directory renamed into place,
  older versions removed first; /dev/shm when `disk_dir` is unset), then `/update_weights_from_disk`; every
  server must see that directory. The server reloads the whole directory, so disk mode always writes the full
  checkpoint (no rollout.sglang.sync_changed_only).
Tensor and distributed updates may carry any subset of the checkpoint's tensors (sync_changed_only): SGLang 0.5.23's
`load_weights` (e.g. models/qwen3_moe.py) writes each named tensor into its slice of the fused parameter on its own
(q/k/v_proj -> qkv_proj shard "q"/"k"/"v", gate/up_proj -> gate_up_proj shard 0/1, experts.E.* -> FusedMoE w13/w2
of expert E) and checks no completeness, and `end_weight_update`'s post-processing runs over the whole model.
"""
from __future__ import annotations

import base64
import errno
import io
import json
import logging
import os
import shutil
import socket
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from grpo_megatron.models.weight_stream import Alloc, Bucket, pack, plain_alloc
from grpo_megatron.ranks import is_rank0, multi_rank, world_size
from grpo_megatron.rollout.sglang.errors import ServerRequestError
from grpo_megatron.rollout.sglang.transport import ServerPool
from grpo_megatron.rollout.sglang.update_group import join_update_group

logger = logging.getLogger(__name__)
GROUP_NAME = "grpo_weight_update"
_CONFIG_FILES = ("config.json", "generation_config.json")

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
            views, fields = bucket.tensors(), _bucket_fields(bucket.last, version)
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
                           {"serialized_named_tensors": pickles, **_bucket_fields(last, version)})

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
                       "load_format": "flattened_bucket", **_bucket_fields(bucket.last, version)}
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


class DiskSync(WeightSync):
    """Versions are written to `<disk_dir>/.v<N>.staging` and renamed to `v<N>` when complete; the older ones go
    before the next is written (the servers hold them in memory), so the directory holds one model at most.

    Without `disk_dir` every server must be on this host, and the directory is made in /dev/shm where there is one:
    1.2 GB went to a fresh file there at ~2.3 GB/s, to /tmp on this machine's disk at 270-330 MB/s.
    """

    def __init__(self, pool: ServerPool, bucket_mb: float, hf_path: str | Path, disk_dir: str | Path | None,
                 load_timeout_s: float | None = None):
        super().__init__(pool, bucket_mb)
        self.hf_path = Path(hf_path)
        self.load_timeout_s = load_timeout_s  # a server reads the whole model: more than a control request's bound
        self._own_dir = not disk_dir
        if self._own_dir:
            remote = [u for u in pool.urls if not is_local_host(u)]
            if remote:
                raise ValueError(f"rollout.sglang.weight_sync=disk: {remote[0]} is on another host and cannot read "
                                 f"a local temporary directory; set rollout.sglang.disk_dir to a directory every "
                                 f"server node sees (the Slurm scripts use RUN_DIR/weights)")
        self.root = Path(disk_dir) if disk_dir else Path(tempfile.mkdtemp(prefix="grpo_sglang_weights_",
                                                                           dir=_memory_filesystem()))
        self.root.mkdir(parents=True, exist_ok=True)

    def transfer(self, buckets: Iterable[Bucket], version: str) -> int:
        target = self.root / f"v{version}"
        for old in [*self.root.glob("v*"), *self.root.glob(".v*.staging")]:
            shutil.rmtree(old, ignore_errors=True)
        try:
            moved = self.write_checkpoint(buckets, target)
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
            raise OSError(err.errno, f"no room for the weights in {self.root}; set rollout.sglang.disk_dir to a "
                                     f"directory with space for one copy of the model") from err
        self._post_all("/update_weights_from_disk", {url: {
            "model_path": str(target), "weight_version": version, "flush_cache": True} for url in self.pool.urls},
            timeout_s=self.load_timeout_s)
        return moved

    def write_checkpoint(self, buckets: Iterable[Bucket], target: Path) -> int:
        """An HF checkpoint dir, atomically: one safetensors shard per bucket, an index, the model's configs."""
        staging = target.with_name(f".{target.name}.staging")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        weight_map, moved = {}, 0
        try:
            def send(item: tuple[int, Bucket]) -> None:
                write_safetensors(item[1], staging / f"model-{item[0]:05d}.safetensors")

            with Pipelined(send) as pipe:
                for i, bucket in enumerate(buckets):
                    pipe.submit((i, bucket))
                    weight_map.update(dict.fromkeys(bucket.names, f"model-{i:05d}.safetensors"))
                    moved += bucket.nbytes
            (staging / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": moved}, "weight_map": weight_map}))
            for name in _CONFIG_FILES:
                if (self.hf_path / name).is_file():
                    shutil.copy(self.hf_path / name, staging / name)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return moved

    def close(self) -> None:
        super().close()
        if self._own_dir:
            shutil.rmtree(self.root, ignore_errors=True)


def _memory_filesystem() -> str | None:
    """/dev/shm when this host has a writable one (a memory file system), else None: the default temp dir."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def write_safetensors(bucket: Bucket, path: Path) -> None:
    """The bucket as a safetensors file: its buffer is already the data section, so it is written as is."""
    header: dict = {"__metadata__": {"format": "pt"}}
    for name, dtype, shape, offset in zip(bucket.names, bucket.dtypes, bucket.shapes, bucket.offsets):
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + dtype.itemsize * int(torch.Size(shape).numel())]}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    data = bucket.flat.cpu().numpy()
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        f.write(memoryview(data))


def _bucket_fields(last: bool, version: str) -> dict:
    """Request fields of a bucket: the last one sets the weight version and flushes the server's cache."""
    return {"weight_version": version, "flush_cache": True} if last else {"flush_cache": False}


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
