"""train.freeze: frozen parameters keep their bits through training and a checkpoint resume; others train."""
from __future__ import annotations

import pytest
import torch

from grpo_megatron.config import ConfigError
from grpo_megatron.models import build_model, load_hf_config
from grpo_megatron.parallel import ParallelLayout
from grpo_megatron.training.loop import Trainer

FROZEN = ["embedding.*", "output_layer.*", "*.self_attention.linear_proj.*"]


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.learner.policy.unwrapped()[0].named_parameters()}


def _is_frozen(name: str) -> bool:
    return name.startswith(("embedding.", "output_layer.")) or "self_attention.linear_proj" in name


def test_frozen_parameters_stay_bitwise_equal_across_steps_and_a_resume(make_config, tmp_path, dist_world1):
    def config(resume: bool):
        return make_config(run_dir=str(tmp_path / "run"), train={"steps": 3, "lr": 3e-3, "freeze": FROZEN},
                           checkpoint={"save_interval": 2, "resume": resume},
                           reward={"functions": [{"name": "tests.training.test_loop:varied_reward"}]})

    first = Trainer(config(resume=False))
    initial = _params(first)
    optimized = {id(p) for group in first.learner.actor.optimizer.param_groups for p in group["params"]}
    chunk = first.learner.policy.unwrapped()[0]
    assert not any(id(p) in optimized for n, p in chunk.named_parameters() if _is_frozen(n))
    first.train_step()
    first.train_step()
    first.save_checkpoint()
    trained = _params(first)
    first.close()
    for name, value in trained.items():
        assert torch.equal(value, initial[name]) == _is_frozen(name), name  # frozen: same bits; others moved

    second = Trainer(config(resume=True))
    assert second.step == 2
    assert all(torch.equal(v, trained[n]) for n, v in _params(second).items())
    second.train_step()
    resumed = _params(second)
    second.close()
    for name, value in resumed.items():
        assert torch.equal(value, initial[name]) == _is_frozen(name), name


def test_a_pattern_that_matches_nothing_names_the_parameters(tiny_hf_dir, dist_world1):
    from grpo_megatron.parallel import init_model_parallel
    from grpo_megatron.models import model_dims

    hf_config = load_hf_config(tiny_hf_dir("qwen3_moe"))
    init_model_parallel(ParallelLayout(), **model_dims(hf_config))
    with pytest.raises(ConfigError, match=r"'decoder\.layer\.\*' match no parameter.*"
                                          r"decoder\.layers\.\*\.self_attention\.linear_qkv\.weight") as err:
        build_model(hf_config, ParallelLayout(), freeze=["embedding.*", "decoder.layer.*"])
    assert "\n" not in str(err.value) and "'embedding.*'" not in str(err.value)
    with pytest.raises(ConfigError, match="freezes every parameter"):
        build_model(hf_config, ParallelLayout(), freeze=["*"])
    with pytest.raises(ConfigError, match=r"freezes decoder\.layers\.\*\.mlp\.experts\.linear_fc1\.weight\* in "
                                          r"some layers or experts only"):
        build_model(hf_config, ParallelLayout(), freeze=["*.mlp.experts.linear_fc1.weight1"])
    with pytest.raises(ConfigError, match=r"freezes .*decoder\.layers\.\*\.self_attention\.linear_proj\.weight, "):
        build_model(hf_config, ParallelLayout(), freeze=["decoder.layers.0.*"])
