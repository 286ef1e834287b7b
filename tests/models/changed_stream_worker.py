"""torchrun worker for test_weight_changes.py: a full sync, then rank 1 alone changes one element of its shard of a
parameter (a local expert under EP, the QKV projection otherwise), then a changed-only sync to every rank. Each rank
records the changed-only bucket sequence, the HF tensors whose full value changed, and whether what it received
equals the full export.

    torchrun --nproc-per-node 2 tests/models/changed_stream_worker.py HF_DIR OUT_DIR [--tp 2 | --ep 2 ...]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from grpo_megatron.models import build_loaded_policy
from grpo_megatron.models.weight_changes import ChangeTracker
from grpo_megatron.models.weight_stream import hf_buckets
from grpo_megatron.parallel import add_layout_arguments, init_distributed, layout_from_args

BUCKET_BYTES = 16 * 1024


def stream(model, only) -> tuple[list[dict], dict[str, torch.Tensor]]:
    sequence, received = [], {}
    for bucket in hf_buckets(model, BUCKET_BYTES, to_every_rank=True, only=only):
        sequence.append({"names": bucket.names, "last": bucket.last})
        received.update((n, t.clone()) for n, t in bucket.tensors())
    return sequence, received


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("hf_dir")
    parser.add_argument("out_dir")
    add_layout_arguments(parser)
    args = parser.parse_args()
    rank, _ = init_distributed()
    model = build_loaded_policy(args.hf_dir, layout_from_args(args))
    tracker = ChangeTracker()
    first = tracker.select(model)
    _, before = stream(model, first)
    tracker.commit()
    if rank == 1:
        params = dict(model.unwrapped()[0].named_parameters())
        key = "experts" if model.bridge.mpu.ep_size > 1 else "layers.0.self_attention.linear_qkv"
        with torch.no_grad():
            params[next(n for n in params if key in n)].view(-1)[0] += 1
    only = tracker.select(model)
    sequence, partial = stream(model, only)
    _, after = stream(model, None)
    report = {"first_was_full": first is None, "sequence": sequence,
              "changed": sorted(n for n in after if not torch.equal(after[n], before[n])),
              "exact": all(torch.equal(t, after[n]) for n, t in partial.items())}
    (Path(args.out_dir) / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    sys.exit(main())
