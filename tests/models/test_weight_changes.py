"""Changed-only weight syncs (grpo_megatron.models.weight_changes): the fingerprint sees every single-element change,
and the stream then carries exactly the HF tensors of changed parameters (all of them on the first sync)."""
from __future__ import annotations

import pytest
import torch

from grpo_megatron.models import build_loaded_policy
from grpo_megatron.models.weight_changes import _CHUNK, ChangeTracker, fingerprint
from grpo_megatron.models.weight_stream import hf_buckets, stage_hf_bytes
from grpo_megatron.parallel import ParallelLayout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_any_single_element_change_moves_the_fingerprint(dtype):
    """One ulp up or down, a sign flip of zero, at the start, the end and in a second chunk of 2**20 elements."""
    base = torch.randn(_CHUNK + 1000, generator=torch.Generator().manual_seed(0)).to(dtype)
    base[5] = 0.0
    reference = int(fingerprint(base))
    assert int(fingerprint(base.clone())) == reference
    for position in (0, 5, 777, _CHUNK - 1, _CHUNK, _CHUNK + 999):
        for target in (float("inf"), float("-inf")):
            changed = base.clone()
            changed[position] = torch.nextafter(changed[position], torch.tensor(target, dtype=dtype))
            assert int(fingerprint(changed)) != reference, (position, target)
    flipped = base.clone()
    flipped[5] = -0.0  # equal as numbers, other bits: the server would hold other bits too
    assert int(fingerprint(flipped)) != reference


def test_moving_a_value_to_another_position_moves_the_fingerprint():
    base = torch.arange(64, dtype=torch.float32)
    swapped = base.clone()
    swapped[[3, 40]] = swapped[[40, 3]]
    assert int(fingerprint(swapped)) != int(fingerprint(base))
    assert int(fingerprint(base.view(8, 8))) == int(fingerprint(base))  # bits and order, not shape


def _streamed(model, only) -> dict[str, torch.Tensor]:
    return {n: t.clone() for b in hf_buckets(model, 16 * 1024, only=only) for n, t in b.tensors()}


def test_the_stream_carries_exactly_the_changed_parameters(tiny_hf_dir, dist_world1):
    model = build_loaded_policy(tiny_hf_dir("qwen3_moe"), ParallelLayout())
    tracker = ChangeTracker()
    first = tracker.select(model)
    assert first is None  # the first sync of a process sends everything
    before = _streamed(model, first)
    tracker.commit()

    params = dict(model.unwrapped()[0].named_parameters())
    with torch.no_grad():
        params["decoder.layers.0.self_attention.linear_qkv.weight"][3, 1] += 1  # one of q/k/v rows
        params["decoder.layers.1.mlp.experts.local_experts.2.linear_fc1.weight"][0, 0] += 1  # expert 2's gate/up
    only = tracker.select(model)
    partial = _streamed(model, only)
    after = _streamed(model, None)
    changed = {n for n in after if not torch.equal(after[n], before[n])}
    assert changed == {"model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.experts.2.gate_proj.weight"}
    anchor = {"model.layers.0.self_attn.q_norm.weight"}  # the last stage's smallest: the request setting the version
    # a changed parameter sends every HF tensor it makes (q, k and v; gate and up)
    assert set(partial) == {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                            "model.layers.0.self_attn.v_proj.weight", "model.layers.1.mlp.experts.2.gate_proj.weight",
                            "model.layers.1.mlp.experts.2.up_proj.weight"} | anchor
    assert all(torch.equal(partial[n], after[n]) for n in partial)
    assert stage_hf_bytes(model, only) == sum(t.numel() * t.element_size() for t in partial.values())
    tracker.commit()
    unchanged = tracker.select(model)
    assert set(_streamed(model, unchanged)) == anchor  # nothing changed: the anchor alone
    assert tracker.select(model, full=True) is None


def test_frozen_parameters_are_not_fingerprinted(tiny_hf_dir, dist_world1):
    """train.freeze's contract: requires_grad False means the value never changes, so its shard is not read."""
    model = build_loaded_policy(tiny_hf_dir("qwen3_moe"), ParallelLayout())
    from grpo_megatron.models.weight_changes import local_fingerprints

    chunk = model.unwrapped()[0]
    chunk.embedding.word_embeddings.weight.requires_grad_(False)
    keys = {name for _, name in local_fingerprints(model)}
    assert "embedding.word_embeddings.weight" not in keys and "output_layer.weight" in keys


CHANGED_LAYOUTS = {  # rank 1 alone changes its shard; the default suite runs the EP case
    "ep2-moe": (["--ep", "2"], {"model.layers.0.mlp.experts.2.gate_proj.weight", "model.layers.0.mlp.experts.2.up_proj.weight"}),
    "tp2-moe": (["--tp", "2"], {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                                "model.layers.0.self_attn.v_proj.weight"}),
}


@pytest.mark.distributed
@pytest.mark.parametrize("name", [pytest.param("ep2-moe"), pytest.param("tp2-moe", marks=pytest.mark.slow)])
def test_every_rank_of_a_stage_streams_the_same_changed_buckets(name, tiny_hf_dir, tmp_path):
    """A change on one rank's shard reaches every rank's selection: same buckets everywhere, only the tensors of
    that parameter (under EP only the owning rank's expert, not the other rank's expert of the same local index)."""
    import json

    from tests.conftest import run_cli

    flags, sent = CHANGED_LAYOUTS[name]
    result = run_cli(["tests/models/changed_stream_worker.py", str(tiny_hf_dir("qwen3_moe")), str(tmp_path), *flags],
                     nproc=2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert reports[0]["sequence"] == reports[1]["sequence"]  # colocated mode broadcasts each bucket to all ranks
    for report in reports:
        assert report["first_was_full"] and report["exact"]
        names = {n for b in report["sequence"] for n in b["names"]}
        assert set(report["changed"]) <= sent
        assert names == sent | {"model.layers.0.self_attn.q_norm.weight"}  # + the last stage's smallest tensor
        assert [b["last"] for b in report["sequence"]][-1] is True
