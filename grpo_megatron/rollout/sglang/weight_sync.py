"""Pushing the trainer's HF-named full tensors to SGLang servers, in SGLang's three ways.

Every mode runs the same envelope on each server: `/begin_weight_update`, the mode's transfer (the last request
carries `weight_version` and `flush_cache: true`, so the server drops the KV cache of the old weights as it applies
them; a separate `/flush_cache` call cost ~0.45 s per sync on SGLang 0.5.23, in-request ~0), `/end_weight_update`.
SGLang rejects tensor and distributed updates outside begin/end with HTTP 400; servers that predate the session
routes answer 404 to begin, and then the envelope is skipped for them (logged once).
- tensor: `/update_weights_from_tensor` with the tensors pickled by torch's ForkingPickler (shared memory, so
  the server must be on this host), base64, one pickle per server and TP rank, in buckets of `bucket_mb`.
- distributed: `/init_weights_update_group` once, then per bucket `/update_weights_from_distributed` (names,
  dtypes, shapes) while rank 0 broadcasts the bucket's tensors in that order (gloo on CPU, NCCL on GPU).
- disk: an HF checkpoint (safetensors + the model's config files) under `disk_dir`, then
  `/update_weights_from_disk`; the servers must see the same filesystem.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import os
import shutil
import sys
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import torch
import torch.multiprocessing as mp
from safetensors.torch import save_file

from grpo_megatron.rollout.sglang.errors import ServerRequestError
from grpo_megatron.rollout.sglang.transport import ServerPool
from grpo_megatron.rollout.sglang.update_group import join_update_group

logger = logging.getLogger(__name__)
GROUP_NAME = "grpo_weight_update"
_CONFIG_FILES = ("config.json", "generation_config.json")

NamedTensors = Iterable[tuple[str, torch.Tensor]]


def buckets(named_tensors: NamedTensors, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive groups of tensors of at most bucket_bytes each (a bigger tensor goes alone)."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


class WeightSync(ABC):
    """One way of moving weights; `push` returns the bytes moved (per server copy) for throughput figures."""

    def __init__(self, pool: ServerPool, bucket_mb: float):
        if not bucket_mb > 0:
            raise ValueError(f"rollout.sglang.bucket_mb={bucket_mb}: must be > 0")
        self.pool = pool
        self.bucket_bytes = max(1, int(bucket_mb * 2**20))  # a fraction of a MiB splits small test models
        self._sessionless: set[str] = set()

    def push(self, named_tensors: NamedTensors, version: int) -> int:
        for url in self.pool.urls:
            self._begin(url)
        moved = self.transfer(named_tensors, str(version))
        for url in self.pool.urls:
            if url not in self._sessionless:
                self.pool.call(url, "POST", "/end_weight_update", {})
        return moved

    @abstractmethod
    def transfer(self, named_tensors: NamedTensors, version: str) -> int:
        """Send all tensors to every server; the last request carries `version` and flushes the cache."""

    def close(self) -> None:
        """Release what the mode holds (process group, files)."""

    def _begin(self, url: str) -> None:
        try:
            self.pool.call(url, "POST", "/begin_weight_update", {})
        except ServerRequestError as err:
            if "HTTP 404" not in str(err):
                raise
            if url not in self._sessionless:
                logger.info("%s has no /begin_weight_update (older SGLang); updating without a session", url)
            self._sessionless.add(url)

    def _post_all(self, path: str, payload: dict) -> None:
        for url in self.pool.urls:
            self.pool.call(url, "POST", path, payload)


class TensorSync(WeightSync):
    def __init__(self, pool: ServerPool, bucket_mb: float, tp_size: int):
        super().__init__(pool, bucket_mb)
        self.tp_size = tp_size
        # CPU tensors pickled with the default fd strategy need a live connection to the sender;
        # the file_system strategy lets the server map them by name (see cpu-platform-facts.md).
        mp.set_sharing_strategy("file_system")
        _start_shm_manager_detached()

    def transfer(self, named_tensors: NamedTensors, version: str) -> int:
        moved = 0
        batches = list(buckets(named_tensors, self.bucket_bytes))
        for i, bucket in enumerate(batches):
            views, fields = _flat_views(bucket), _bucket_fields(i == len(batches) - 1, version)
            for url in self.pool.urls:  # a pickle per server and TP rank: see _pickle
                payload = {"serialized_named_tensors": [_pickle(views) for _ in range(self.tp_size)], **fields}
                self.pool.call(url, "POST", "/update_weights_from_tensor", payload)
            moved += sum(t.numel() * t.element_size() for _, t in bucket)
        return moved


class DistributedSync(WeightSync):
    def __init__(self, pool: ServerPool, bucket_mb: float, tp_size: int, master_address: str, master_port: int,
                 backend: str):
        super().__init__(pool, bucket_mb)
        self.tp_size = tp_size
        self.master_address, self.master_port, self.backend = master_address, master_port, backend
        self.device = torch.device("cuda" if backend == "nccl" else "cpu")
        self._group = None
        self._store = None

    def transfer(self, named_tensors: NamedTensors, version: str) -> int:
        if self._group is None:
            self._group = self._init_group()
        moved = 0
        batches = list(buckets(named_tensors, self.bucket_bytes))
        for i, bucket in enumerate(batches):
            payload = {"names": [n for n, _ in bucket], "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
                       "shapes": [list(t.shape) for _, t in bucket], "group_name": GROUP_NAME,
                       **_bucket_fields(i == len(batches) - 1, version)}
            with ThreadPoolExecutor(len(self.pool.urls)) as executor:
                calls = [executor.submit(self.pool.call, url, "POST", "/update_weights_from_distributed", payload,
                                         None, False) for url in self.pool.urls]
                for _, tensor in bucket:
                    torch.distributed.broadcast(tensor.to(self.device).contiguous(), src=0, group=self._group)
                for call in calls:
                    call.result()
            moved += sum(t.numel() * t.element_size() for _, t in bucket)
        return moved

    def _init_group(self):
        world_size = 1 + self.tp_size * len(self.pool.urls)
        with ThreadPoolExecutor(len(self.pool.urls)) as executor:
            calls = [executor.submit(self.pool.call, url, "POST", "/init_weights_update_group", {
                "master_address": self.master_address, "master_port": self.master_port,
                "rank_offset": 1 + i * self.tp_size, "world_size": world_size, "group_name": GROUP_NAME,
                "backend": self.backend}, None, False) for i, url in enumerate(self.pool.urls)]
            group, self._store = join_update_group(self.master_address, self.master_port, world_size, GROUP_NAME, self.backend,
                                      self.pool.timeout_s)
            for call in calls:
                call.result()
        return group

    def close(self) -> None:
        if self._group is not None:
            for url in self.pool.urls:
                self.pool.call(url, "POST", "/destroy_weights_update_group", {"group_name": GROUP_NAME})
            torch.distributed.destroy_process_group(self._group)
            self._group = self._store = None


class DiskSync(WeightSync):
    def __init__(self, pool: ServerPool, bucket_mb: float, hf_path: str | Path, disk_dir: str | Path | None):
        super().__init__(pool, bucket_mb)
        self.hf_path = Path(hf_path)
        self._own_dir = disk_dir is None
        self.root = Path(disk_dir) if disk_dir else Path(tempfile.mkdtemp(prefix="grpo_sglang_weights_"))

    def transfer(self, named_tensors: NamedTensors, version: str) -> int:
        target = self.root / f"v{version}"
        moved = self.write_checkpoint(named_tensors, target)
        self._post_all("/update_weights_from_disk", {"model_path": str(target), "weight_version": version,
                                                     "flush_cache": True})
        for old in self.root.glob("v*"):
            if old != target:
                shutil.rmtree(old, ignore_errors=True)
        return moved

    def write_checkpoint(self, named_tensors: NamedTensors, target: Path) -> int:
        """An HF checkpoint dir: one safetensors shard per bucket, an index, and the model's config files."""
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        weight_map, moved = {}, 0
        for i, bucket in enumerate(buckets(named_tensors, self.bucket_bytes)):
            shard = f"model-{i:05d}.safetensors"
            save_file({n: t.detach().contiguous().cpu() for n, t in bucket}, str(target / shard),
                      metadata={"format": "pt"})
            weight_map.update({n: shard for n, _ in bucket})
            moved += sum(t.numel() * t.element_size() for _, t in bucket)
        (target / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": moved}, "weight_map": weight_map}))
        for name in _CONFIG_FILES:
            if (self.hf_path / name).is_file():
                shutil.copy(self.hf_path / name, target / name)
        return moved

    def close(self) -> None:
        if self._own_dir:
            shutil.rmtree(self.root, ignore_errors=True)


def _bucket_fields(last: bool, version: str) -> dict:
    """Request fields of a bucket: the last one sets the weight version and flushes the server's cache."""
    return {"weight_version": version, "flush_cache": True} if last else {"flush_cache": False}


def _start_shm_manager_detached() -> None:
    """Start torch's shared-memory daemon (torch_shm_manager) with its stdout/stderr on /dev/null.

    The file_system strategy spawns that daemon at the first share, and it inherits the trainer's stdio. It lives
    as long as a server still maps shared tensors, i.e. past the trainer's exit, so a caller reading the trainer's
    output through a pipe (CI, `subprocess.run(capture_output=True)`, `| tee`) would wait for the server to stop.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            os.dup2(devnull, fd)
        torch.empty(1).share_memory_()  # the first share starts the daemon (a no-op once it runs)
    finally:
        for fd, old in zip((1, 2), saved):
            os.dup2(old, fd)
            os.close(old)
        os.close(devnull)


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


_ALIGN = 64  # bytes: every view starts at a multiple of any element size


def _flat_views(named_tensors: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """The bucket copied into one shared byte buffer, as views of it.

    A bucket then shares one storage: on CPU one registration with torch's shm daemon instead of one per tensor
    (each must be answered within 1 s, which a loaded machine missed: "Shared memory manager connection has timed
    out"), on GPU one CUDA IPC handle.
    """
    offsets, total = [], 0
    for _, tensor in named_tensors:
        offsets.append(total)
        total += -(-tensor.numel() * tensor.element_size() // _ALIGN) * _ALIGN
    flat = torch.empty(total, dtype=torch.uint8, device=named_tensors[0][1].device)
    if flat.device.type == "cpu":
        for attempt in range(3):  # the shm daemon may miss its 1 s deadline under load; the share is idempotent
            try:
                flat.share_memory_()
                break
            except RuntimeError as err:
                if "Shared memory manager" not in str(err) or attempt == 2:
                    raise
                logger.warning("retrying a shared-memory allocation for the weight sync: %s", err)
    views = []
    for (name, tensor), offset in zip(named_tensors, offsets):
        nbytes = tensor.numel() * tensor.element_size()
        view = flat[offset:offset + nbytes].view(tensor.dtype).view(tensor.shape)
        view.copy_(tensor.detach())
        views.append((name, view))
    return views
