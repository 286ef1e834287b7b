"""Bad inputs to the conversion each fail with a message naming the problem, writing nothing."""
import importlib.util
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from grpo_megatron.models import (
    UnsupportedModelError, WeightMismatchError, build_model, load_hf_config, load_hf_weights, model_dims,
    validate_hf_config)
from grpo_megatron.models.tiny import tiny_hf_config
from grpo_megatron.parallel import ParallelLayout, init_model_parallel
from tests.conftest import REPO, run_cli


def edited_checkpoint(src, dst, edit_weights=None, edit_config=None):
    shutil.copytree(src, dst)
    if edit_weights:
        weights = load_file(dst / "model.safetensors")
        edit_weights(weights)
        save_file(weights, dst / "model.safetensors")
    if edit_config:
        config = json.loads((dst / "config.json").read_text())
        edit_config(config)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def load_into_new_model(hf_dir):
    config = load_hf_config(hf_dir)
    init_model_parallel(ParallelLayout(), **model_dims(config))
    load_hf_weights(build_model(config, ParallelLayout()), hf_dir)


def test_unknown_architecture_is_refused(tmp_path):
    import transformers

    transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="unsupported architecture 'gpt2'.*qwen3_moe"):
        load_hf_config(tmp_path)


@pytest.mark.parametrize("family, field, value, message", [
    ("llama", "hidden_act", "gelu", "hidden_act='gelu'"),
    ("qwen2", "use_sliding_window", True, "sliding-window"),
    ("llama", "attention_bias", True, "attention_bias"),
    ("llama", "mlp_bias", True, "mlp_bias"),
    ("qwen3_moe", "mlp_only_layers", [0], "mlp_only_layers"),
    ("mixtral", "router_jitter_noise", 0.1, "router_jitter_noise"),
    ("llama", "rope_parameters", {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}, "rope scaling"),
])
def test_unsupported_config_fields_are_named(family, field, value, message):
    config = tiny_hf_config(family)
    setattr(config, field, value)
    with pytest.raises(UnsupportedModelError, match=message):
        validate_hf_config(config)


def test_missing_weight_is_named(tiny_hf_dir, tmp_path, dist_world1):
    hf = edited_checkpoint(tiny_hf_dir("qwen3"), tmp_path / "hf",
                           edit_weights=lambda w: w.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(WeightMismatchError, match=r"missing HF tensor\(s\) \['model.layers.1.self_attn.k_proj"):
        load_into_new_model(hf)


def test_left_over_weight_is_named(tiny_hf_dir, tmp_path, dist_world1):
    def add(weights):
        weights["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(2, 2)

    hf = edited_checkpoint(tiny_hf_dir("qwen3_moe"), tmp_path / "hf", edit_weights=add)
    with pytest.raises(WeightMismatchError, match="not used by the megatron model.*extra_proj"):
        load_into_new_model(hf)


def test_shape_mismatch_is_named(tiny_hf_dir, tmp_path, dist_world1):
    def shrink(weights):
        weights["model.layers.0.mlp.down_proj.weight"] = weights["model.layers.0.mlp.down_proj.weight"][:, :64].contiguous()

    hf = edited_checkpoint(tiny_hf_dir("llama"), tmp_path / "hf", edit_weights=shrink)
    with pytest.raises(WeightMismatchError, match="down_proj.weight.*linear_fc2"):
        load_into_new_model(hf)


@pytest.mark.multiprocess
def test_cli_failure_leaves_nothing_at_output(tiny_hf_dir, tmp_path):
    hf = edited_checkpoint(tiny_hf_dir("mixtral"), tmp_path / "hf",
                           edit_weights=lambda w: w.pop("model.layers.0.block_sparse_moe.experts.2.w3.weight"))
    result = run_cli(["tools/convert_hf_to_megatron.py", "--hf-path", str(hf), "--output", str(tmp_path / "out")])
    assert result.returncode != 0
    assert "missing HF tensor" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.multiprocess
def test_cli_layout_that_does_not_fit_the_world(tiny_hf_dir, tmp_path):
    result = run_cli(["tools/convert_hf_to_megatron.py", "--hf-path", str(tiny_hf_dir("qwen3_moe")),
                      "--output", str(tmp_path / "out"), "--tp", "2"])
    assert result.returncode != 0
    assert "world size 1 is not divisible by tensor_parallel" in result.stderr
    assert not (tmp_path / "out").exists()


def load_tool(name: str):
    """A tools/ script as a module, to call its main in this process (the scripts' own runs are the tests above)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_help_and_missing_checkpoint(tmp_path, capsys):
    for tool in ("convert_hf_to_megatron", "convert_megatron_to_hf"):
        with pytest.raises(SystemExit) as help_exit:
            load_tool(tool).main(["--help"])
        assert help_exit.value.code == 0 and "--output" in capsys.readouterr().out
    # fails reading the checkpoint, before any process group is made
    with pytest.raises(FileNotFoundError, match="is not a grpo_megatron megatron checkpoint"):
        load_tool("convert_megatron_to_hf").main(["--megatron-path", str(tmp_path / "nope"),
                                                  "--output", str(tmp_path / "hf")])
    assert not (tmp_path / "hf").exists()
