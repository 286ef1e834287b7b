"""HF -> megatron -> HF for every supported family: exact weights, logits equal to transformers."""
import pytest
import torch
import transformers
from safetensors.torch import load_file

from grpo_megatron.models import build_model, load_hf_config, load_hf_weights, model_dims, save_hf_checkpoint
from grpo_megatron.models.mcore_checkpoint import load_mcore_checkpoint, save_mcore_checkpoint
from grpo_megatron.models.tiny import SUPPORTED_FAMILIES
from grpo_megatron.parallel import ParallelLayout, init_model_parallel

LOGIT_TOLERANCE = 1e-4


def megatron_logits(model, input_ids):
    positions = torch.arange(input_ids.shape[1]).unsqueeze(0).expand_as(input_ids)
    with torch.no_grad():
        return model.chunks[0](input_ids=input_ids, position_ids=positions, attention_mask=None)


def build_at_tp1(hf_dir):
    config = load_hf_config(hf_dir)
    layout = ParallelLayout()
    init_model_parallel(layout, **model_dims(config))
    return build_model(config, layout)


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_logits_match_transformers(family, tiny_hf_dir, dist_world1):
    hf_dir = tiny_hf_dir(family)
    model = build_at_tp1(hf_dir)
    load_hf_weights(model, hf_dir)
    input_ids = torch.randint(4, 64, (3, 17), generator=torch.Generator().manual_seed(0))
    reference = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        expected = reference(input_ids).logits
    diff = (megatron_logits(model, input_ids) - expected).abs().max().item()
    print(f"{family}: max |logits - transformers| = {diff:.3g}")
    assert diff < LOGIT_TOLERANCE


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_round_trip_through_dist_checkpoint_is_bit_exact(family, tiny_hf_dir, dist_world1, tmp_path):
    hf_dir = tiny_hf_dir(family)
    model = build_at_tp1(hf_dir)
    load_hf_weights(model, hf_dir)
    save_mcore_checkpoint(model, tmp_path / "mcore", tokenizer_path=hf_dir)

    fresh = build_at_tp1(hf_dir)  # random init, then the checkpoint
    load_mcore_checkpoint(fresh, tmp_path / "mcore")
    save_hf_checkpoint(fresh, tmp_path / "hf", tokenizer_path=hf_dir)

    original = load_file(hf_dir / "model.safetensors")
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    assert set(exported) == set(original)
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(reloaded).__name__ == load_hf_config(hf_dir).architectures[0]
    assert (tmp_path / "hf" / "tokenizer.json").exists()
