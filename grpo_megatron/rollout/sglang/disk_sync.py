"""Disk mode: the bucket bytes written as safetensors shards under `disk_dir` (a staging directory renamed into
place, older versions removed first; /dev/shm when `disk_dir` is unset), then `/update_weights_from_disk`; every
server must see that directory. The server reloads the whole directory, so disk mode always writes the full
checkpoint (no rollout.sglang.sync_changed_only).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

from grpo_megatron.models.weight_stream import Bucket
from grpo_megatron.rollout.sglang.transport import ServerPool
from grpo_megatron.rollout.sglang.weight_sync import Pipelined, WeightSync, is_local_host

_CONFIG_FILES = ("config.json", "generation_config.json")


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
