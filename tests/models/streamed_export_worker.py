"""torchrun worker for test_streamed_export.py: stream a sharded tiny model in small buckets and record, per rank,
what it received, how many bucket buffers were alive at once, and the bucket sequence.

    torchrun --nproc-per-node 2 tests/models/streamed_export_worker.py HF_DIR OUT_DIR BUCKET_BYTES EVERY [--tp 2 ...]
"""
from __future__ import annotations

import json
import sys
import time
import weakref
from pathlib import Path

import torch
from safetensors.torch import save_file

import torch.distributed as dist

from grpo_megatron.models import build_loaded_policy
from grpo_megatron.models.weight_stream import hf_buckets, plain_alloc, stage_hf_bytes
from grpo_megatron.parallel import (
    add_layout_arguments, control_group, init_distributed, layout_from_args)
from grpo_megatron.rollout.sglang.weight_sync import Pipelined


class CountingAlloc:
    """plain_alloc that counts the bucket buffers alive at any moment (freed when the last view goes)."""

    def __init__(self):
        self.alive = self.peak = 0

    def __call__(self, nbytes: int, device: torch.device) -> torch.Tensor:
        flat = plain_alloc(nbytes, device)
        self.alive += 1
        self.peak = max(self.peak, self.alive)
        weakref.finalize(flat.untyped_storage(), self._freed)
        return flat

    def _freed(self) -> None:
        self.alive -= 1


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("hf_dir")
    parser.add_argument("out_dir")
    parser.add_argument("bucket_bytes", type=int)
    parser.add_argument("every", type=int)
    add_layout_arguments(parser)
    args = parser.parse_args()
    rank, _ = init_distributed()
    model = build_loaded_policy(args.hf_dir, layout_from_args(args))

    alloc = CountingAlloc()
    received: dict[str, torch.Tensor] = {}
    sequence = []

    def send(bucket) -> None:  # a slow consumer: the next bucket is assembled meanwhile
        time.sleep(0.01)
        for name, tensor in bucket.tensors():
            received.setdefault(name, tensor.clone())

    with Pipelined(send) as pipe:
        for bucket in hf_buckets(model, args.bucket_bytes, bool(args.every), alloc):
            sequence.append({"names": bucket.names, "nbytes": bucket.nbytes, "last": bucket.last})
            pipe.submit(bucket)
            del bucket
    stages: list = [None] * dist.get_world_size()
    dist.all_gather_object(stages, (model.bridge.mpu.pp_rank, stage_hf_bytes(model)), group=control_group())
    out = Path(args.out_dir)
    if received:
        save_file(received, str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps({"sequence": sequence, "peak_buffers": alloc.peak,
                                                             "size_hint": sum(dict(stages).values())}))


if __name__ == "__main__":
    sys.exit(main())
