"""rollout.sglang.sync_changed_only against mock SGLang servers: after several partial syncs every server holds the
trainer's weights bit for bit, each partial sync sent only the changed tensors, and a server that lost the last
push (restarted) gets a full one."""
from __future__ import annotations

import httpx
import pytest
import torch

from grpo_megatron.config import ConfigError, load_config
from grpo_megatron.models import build_loaded_policy, export_hf_weights
from grpo_megatron.parallel import ParallelLayout
from grpo_megatron.rollout.factory import make_engine
from grpo_megatron.training.weight_push import WeightPush
from tests.sglang.conftest import server_weights, weight_updates
from tests.sglang.test_weight_sync import SMALL_BUCKET_MB, assert_holds

ANCHOR = "model.layers.0.self_attn.q_norm.weight"  # the smallest tensor: the request that sets the version
EDITS = [  # megatron parameters changed before each sync, and the HF tensors the partial sync must carry
    ([], None),
    (["decoder.layers.0.self_attention.linear_proj.weight"], {"model.layers.0.self_attn.o_proj.weight"}),
    (["decoder.layers.1.mlp.experts.local_experts.3.linear_fc2.weight", "embedding.word_embeddings.weight"],
     {"model.layers.1.mlp.experts.3.down_proj.weight", "model.embed_tokens.weight"}),
    ([], set()),
]


def config(mock: list[str], model_dir, mode: str, **sglang):
    return load_config(None, {
        "model": {"hf_path": str(model_dir)}, "data": {"train_files": ["unused.jsonl"]},
        "reward": {"functions": [{"name": "copy"}]},
        "rollout": {"engine": "sglang", "sglang": {"urls": mock, "weight_sync": mode, "bucket_mb": SMALL_BUCKET_MB,
                                                   "probe_tolerance": 1e-4, **sglang}}})


def _sent(url: str, before: int) -> set[str]:
    return {n for update in weight_updates(url)[before:] for n in update["names"]}


@pytest.mark.parametrize("mode", ["tensor", "distributed"])
def test_partial_syncs_leave_every_server_with_the_trainers_weights(mode, mock, tiny_hf_dir, dist_world1):
    model_dir = tiny_hf_dir("qwen3_moe")
    model = build_loaded_policy(model_dir, ParallelLayout())
    params = dict(model.unwrapped()[0].named_parameters())
    cfg = config(mock, model_dir, mode, sync_changed_only=True)
    engine = make_engine(cfg.rollout, cfg.model.hf_path, cfg.train.seed, torch.float32)
    push = WeightPush(cfg.rollout, cfg.model.hf_path, engine)
    try:
        for version, (edit, expected) in enumerate(EDITS, 1):
            with torch.no_grad():
                for name in edit:
                    params[name].view(-1)[version] += 0.5
            counts = [len(weight_updates(url)) for url in mock]
            push.run(model, version)
            weights = sorted(export_hf_weights(model))
            for url, before in zip(mock, counts):
                assert_holds(server_weights(url), weights)
                assert _sent(url, before) == ({n for n, _ in weights} if expected is None else expected | {ANCHOR})
            assert engine.last_sync["full"] == float(expected is None)
            assert engine.last_sync["probe_max_abs_diff"] < 1e-4  # the probe's reference keeps unsent tensors
        full_bytes = sum(t.numel() * t.element_size() for _, t in weights)
        assert engine.last_sync["bytes"] < full_bytes / 100

        httpx.post(mock[1] + "/update_weight_version", json={"new_version": "default"})  # as a restarted server
        with torch.no_grad():
            params["output_layer.weight"].view(-1)[0] += 0.5
        counts = [len(weight_updates(url)) for url in mock]
        push.run(model, len(EDITS) + 1)
        weights = sorted(export_hf_weights(model))
        for url, before in zip(mock, counts):
            assert_holds(server_weights(url), weights)
            assert _sent(url, before) == {n for n, _ in weights}
        assert engine.last_sync["full"] == 1.0 and engine.last_sync["bytes"] == full_bytes
    finally:
        engine.shutdown()


def test_changed_only_is_off_by_default_and_not_for_disk_mode(tiny_hf_dir):
    model_dir = tiny_hf_dir("qwen3_moe")
    assert config(["http://127.0.0.1:1"], model_dir, "tensor").rollout.sglang.sync_changed_only is False
    with pytest.raises(ConfigError, match="disk mode always writes the full checkpoint"):
        config(["http://127.0.0.1:1"], model_dir, "disk", sync_changed_only=True)
