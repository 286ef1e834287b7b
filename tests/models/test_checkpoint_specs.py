"""Megatron checkpoints across layer specs: what a TransformerEngine (GPU) model saves loads into the local
(CPU) spec and back, a checkpoint of another model is refused with one message, and nothing in a saved
checkpoint names the directory it was written from.

No TE here, so the TE side is the local model's sharded state renamed the way megatron-core's TE spec
names it (an MoE layer's pre-MLP norm as its own module, no `_extra_state` for it).
"""
from __future__ import annotations

import pytest
import torch
import transformers

from grpo_megatron.models import build_model, model_dims
from grpo_megatron.models import mcore_checkpoint as mc
from grpo_megatron.parallel import ParallelLayout, init_model_parallel


@pytest.fixture
def moe_model(tiny_hf_dir, dist_world1):
    """A fresh tiny Qwen3-MoE policy (local spec) per call, each with its own random init."""
    config = transformers.AutoConfig.from_pretrained(tiny_hf_dir("qwen3_moe"))
    init_model_parallel(ParallelLayout(), **model_dims(config))

    def make(seed: int):
        torch.manual_seed(seed)
        return build_model(config, ParallelLayout())
    return make


def save_renamed(model, path, rename, monkeypatch) -> None:
    """Save `model` with its sharded keys passed through `rename` (None drops the entry)."""
    original = mc.sharded_model_state

    def renamed(m):
        state = original(m)
        for chunk in state.values():
            for name, item in list(chunk.items()):
                new = rename(item.key)
                if new is None:
                    del chunk[name]
                else:
                    item.key = new
        return state
    monkeypatch.setattr(mc, "sharded_model_state", renamed)
    mc.save_mcore_checkpoint(model, path)
    monkeypatch.setattr(mc, "sharded_model_state", original)


def te_spec_name(key: str) -> str | None:
    """How megatron-core's TE spec names this local-spec key of an MoE layer (None: TE has no such entry)."""
    if key.endswith("mlp.linear_fc1.layer_norm_weight"):
        return key.replace("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight")
    if key.endswith("linear_qkv._extra_state"):
        return None  # as if the saving side had none of the other side's extra state
    return key


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.chunks[0].named_parameters()}


def test_a_te_named_moe_checkpoint_loads_into_the_local_spec(moe_model, tmp_path, monkeypatch):
    source, target = moe_model(1), moe_model(2)
    save_renamed(source, tmp_path / "ckpt", te_spec_name, monkeypatch)
    mc.load_mcore_checkpoint(target, tmp_path / "ckpt")
    expected, got = params(source), params(target)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_checkpoint_of_another_model_is_refused_naming_the_fix(moe_model, tmp_path, monkeypatch):
    save_renamed(moe_model(1), tmp_path / "ckpt", lambda k: None if "router" in k else k, monkeypatch)
    with pytest.raises(mc.CheckpointMismatchError, match=r"lacks \d+ weight\(s\).*router.*convert_hf_to_megatron"):
        mc.load_mcore_checkpoint(moe_model(2), tmp_path / "ckpt")


def test_a_saved_checkpoint_records_its_spec_and_no_path(moe_model, tmp_path):
    out = tmp_path / "ckpt"
    mc.save_mcore_checkpoint(moe_model(1), out)
    assert mc.read_checkpoint_config(out)[1]["layer_spec"] == "local"
    leaks = [f.name for f in out.rglob("*") if f.is_file() and str(tmp_path).encode() in f.read_bytes()]
    assert leaks == []
