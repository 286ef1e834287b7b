"""Streamed export (grpo_megatron.models.weight_stream): at TP2 / PP2 / EP2 under 2 gloo processes the receivers
get exactly the checkpoint, in buckets of bounded size with `last` on the final one only, with at most two bucket
buffers alive per rank; and one process gives the same as mbridge's export."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from grpo_megatron.models import build_loaded_policy, export_hf_weights
from grpo_megatron.models.weight_stream import Bucket, BucketPacker, hf_buckets, pack, stage_hf_bytes
from grpo_megatron.parallel import ParallelLayout
from tests.conftest import run_cli

LAYOUTS = {
    "tp2-moe": ("qwen3_moe", ["--tp", "2"]),  # TP shards and ETP experts gathered in the TP group
    "pp2": ("llama", ["--pp", "2"]),  # each stage its own layers
    "ep2-moe": ("qwen3_moe", ["--ep", "2"]),  # experts from their EP owners
    "ep2-mixtral": ("mixtral", ["--ep", "2"]),
}
BUCKET_BYTES = 16 * 1024


# The default suite runs one case with gathers in the TP group to every rank and one with stage leaders to
# rank 0; the other layouts and receivers are behind -m slow (each case is a 2-process torchrun).
DEFAULT_CASES = {("tp2-moe", 1), ("pp2", 0)}


@pytest.mark.distributed
@pytest.mark.parametrize("name, every", [
    pytest.param(name, every, id=f"{name}-{'to-every-rank' if every else 'to-rank0'}",
                 marks=() if (name, every) in DEFAULT_CASES else pytest.mark.slow)
    for name in sorted(LAYOUTS) for every in (0, 1)])
def test_every_receiver_gets_exactly_the_model(name, every, tiny_hf_dir, tmp_path):
    family, flags = LAYOUTS[name]
    hf_dir = tiny_hf_dir(family)
    result = run_cli(["tests/models/streamed_export_worker.py", str(hf_dir), str(tmp_path), str(BUCKET_BYTES),
                      str(every), *flags], nproc=2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    original = load_file(hf_dir / "model.safetensors")
    for rank in (0, 1) if every else (0,):
        got = load_file(tmp_path / f"rank{rank}.safetensors")
        assert set(got) == set(original)
        assert all(torch.equal(got[k], original[k]) for k in original)
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        sequence = report["sequence"]
        names = [n for b in sequence for n in b["names"]]
        assert len(names) == len(set(names)) == len(original)  # each tensor once
        assert [b["last"] for b in sequence] == [False] * (len(sequence) - 1) + [True]
        assert all(b["nbytes"] <= BUCKET_BYTES or len(b["names"]) == 1 for b in sequence)
        assert len(sequence) >= 3
        assert report["peak_buffers"] <= 2, report["peak_buffers"]
        assert report["size_hint"] == sum(b["nbytes"] for b in sequence)  # sizes the last buffer
    if not every:
        assert not (tmp_path / "rank1.safetensors").exists()  # only rank 0 receives
    if name == "pp2":  # stage 0's layers, then stage 1's
        layers = [int(n.split(".")[2]) for n in names if n.startswith("model.layers.")]
        assert layers == sorted(layers)


def test_one_process_stream_equals_the_bridge_export(tiny_hf_dir, dist_world1):
    hf_dir = tiny_hf_dir("qwen3_moe")
    model = build_loaded_policy(hf_dir, ParallelLayout())
    streamed = [(n, t.clone()) for b in hf_buckets(model, BUCKET_BYTES) for n, t in b.tensors()]
    exported = list(export_hf_weights(model))
    assert [n for n, _ in streamed] == [n for n, _ in exported]
    assert stage_hf_bytes(model) == sum(t.numel() * t.element_size() for _, t in exported)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(streamed, exported))


def test_a_full_bucket_is_handed_over_before_the_next_is_allocated():
    """pack() yields a full bucket before it allocates the next buffer: with the consumer's one bucket in flight,
    never more than two exist."""
    allocated = []

    def alloc(nbytes, device):
        allocated.append(nbytes)
        return torch.empty(nbytes, dtype=torch.uint8)

    stream = pack([(str(i), torch.full((256,), float(i))) for i in range(6)], 2048, alloc)  # 2 tensors a bucket
    first = next(stream)
    assert len(allocated) == 1 and first.names == ["0", "1"]
    second = next(stream)
    assert len(allocated) == 2 and second.names == ["2", "3"]
    assert [b.names for b in stream] == [["4", "5"]]
    assert torch.equal(dict(second.tensors())["3"], torch.full((256,), 3.0))


def test_the_size_hint_sizes_only_the_last_buffer():
    allocated = []

    def alloc(nbytes, device):
        allocated.append(nbytes)
        return torch.empty(nbytes, dtype=torch.uint8)

    tensors = [(str(i), torch.zeros(100)) for i in range(5)]  # 400 bytes each
    assert [b.names for b in pack(tensors, 1000, alloc)] == [["0", "1"], ["2", "3"], ["4"]]
    assert allocated == [1000, 1000, 400]
    allocated.clear()
    short = [b.names for b in pack(iter(tensors), 1000, alloc, total_bytes=1000)]  # a wrong hint: other cuts
    assert short == [["0", "1"], ["2"], ["3", "4"]] and allocated == [1000, 400, 1000]


def test_a_tensor_larger_than_a_bucket_travels_alone():
    packed = list(pack([("a", torch.zeros(10)), ("big", torch.zeros(1000)), ("b", torch.zeros(10))], 256))
    assert [b.names for b in packed] == [["a"], ["big"], ["b"]]
    assert packed[1].nbytes == 4000 and packed[1].flat.numel() == 4000


def test_dry_packer_cuts_where_the_real_one_does():
    tensors = [(str(i), torch.zeros(i * 7 + 1, dtype=torch.float16 if i % 3 else torch.float32)) for i in range(40)]
    real = [b.names for b in pack(tensors, 300)]
    dry = [b.names for b in pack(tensors, 300, dry=True)]
    assert real == dry and len(real) > 3


def test_bucket_views_sit_back_to_back_in_sglang_layout():
    """SGLang's FlattenedTensorBucket.empty: tensor i starts at the sum of the sizes before it, no padding."""
    bucket = next(pack([("a", torch.ones(3)), ("b", torch.ones(2, dtype=torch.float16)), ("c", torch.ones(1))],
                       1 << 10))
    assert isinstance(bucket, Bucket) and bucket.offsets == [0, 12, 16] and bucket.nbytes == 20
    with pytest.raises(ValueError, match="bucket_mb"):
        BucketPacker(0)
