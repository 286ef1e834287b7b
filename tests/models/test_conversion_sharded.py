"""Sharded conversion under 2 gloo processes (TP=2, PP=2, EP=2), and loading at another layout."""
import pytest
import torch
import transformers
from safetensors.torch import load_file

from grpo_megatron.models import build_model, model_dims
from grpo_megatron.models.mcore_checkpoint import load_mcore_checkpoint, read_checkpoint_config
from grpo_megatron.parallel import ParallelLayout, init_model_parallel
from tests.conftest import run_cli

LAYOUTS = {
    "tp2": ("qwen3_moe", ["--tp", "2"]),  # MoE + TP -> sequence parallel
    "pp2": ("llama", ["--pp", "2"]),
    "ep2": ("mixtral", ["--ep", "2"]),
}


def assert_ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


@pytest.mark.distributed
@pytest.mark.parametrize("name", [pytest.param(name, marks=() if name == "ep2" else pytest.mark.slow)
                                  for name in sorted(LAYOUTS)])  # tp2/pp2: -m slow (2-process torchrun each)
def test_sharded_export_and_import_give_the_same_hf_weights(name, tiny_hf_dir, tmp_path, dist_world1):
    family, flags = LAYOUTS[name]
    hf_dir = tiny_hf_dir(family)
    mcore, hf_out = tmp_path / "mcore", tmp_path / "hf"
    assert_ok(run_cli(["tools/convert_hf_to_megatron.py", "--hf-path", str(hf_dir), "--output", str(mcore),
                       *flags], nproc=2))
    assert read_checkpoint_config(mcore)[1]["saved_layout"]["tensor_parallel"] == (2 if name == "tp2" else 1)
    assert_ok(run_cli(["tools/convert_megatron_to_hf.py", "--megatron-path", str(mcore), "--output", str(hf_out),
                       *flags], nproc=2))
    original = load_file(hf_dir / "model.safetensors")
    exported = load_file(hf_out / "model.safetensors")
    assert set(exported) == set(original)
    assert all(torch.equal(exported[k], original[k]) for k in original)

    # The checkpoint saved sharded loads unsharded (TP2/PP2/EP2 -> TP1) and gives transformers' logits.
    config, _ = read_checkpoint_config(mcore)
    init_model_parallel(ParallelLayout(), **model_dims(config))
    model = build_model(config, ParallelLayout())
    load_mcore_checkpoint(model, mcore)
    ids = torch.randint(4, 64, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model.chunks[0](input_ids=ids, position_ids=torch.arange(11).expand(2, -1), attention_mask=None)
        expected = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()(ids).logits
    assert (logits - expected).abs().max().item() < 1e-4
