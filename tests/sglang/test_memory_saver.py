"""Colocated GPU servers release their weights for training; without CPU backup what comes back is garbage.

The mock follows SGLang 0.5.23 (tests/sglang/mock_memory.py memory_occupation cites the lines): with
--enable-memory-saver a release of `weights` drops them unless --enable-weights-cpu-backup, resume maps back memory
that holds no weights and restores only the model's buffers, and /model_info's weight version survives; without
--enable-memory-saver nothing is freed. So after a release the next push must carry every tensor, even with
rollout.sglang.sync_changed_only: the post-sync probe sees the difference.
"""
from __future__ import annotations

import httpx
import pytest
import torch

from grpo_megatron.config import load_config
from grpo_megatron.models import build_loaded_policy, export_hf_weights
from grpo_megatron.parallel import ParallelLayout
from grpo_megatron.rollout.factory import make_engine
from grpo_megatron.training.weight_push import WeightPush, release_rollout_memory
from tests.sglang.conftest import server_weights, weight_updates
from tests.sglang.test_weight_sync import SMALL_BUCKET_MB, assert_holds


def _memory(url: str, path: str, tags: list[str]) -> None:
    httpx.post(url + path, json={"tags": tags}, timeout=30).raise_for_status()


def _version(url: str) -> str:
    return httpx.get(url + "/model_info", timeout=30).json()["weight_version"]


def test_released_weights_come_back_as_garbage_with_the_version_kept(mock_gpu_config_url, mock):
    url = mock_gpu_config_url
    before, version = server_weights(url), _version(url)
    _memory(url, "/release_memory_occupation", ["weights", "kv_cache"])
    _memory(url, "/resume_memory_occupation", ["weights", "kv_cache"])
    after = server_weights(url)
    assert _version(url) == version
    assert all(not torch.equal(before[n], after[n]) for n in before)
    # Without --enable-memory-saver a release frees nothing (SGLang's noop memory-saver adapter).
    kept = server_weights(mock[0])
    _memory(mock[0], "/release_memory_occupation", ["weights", "kv_cache"])
    _memory(mock[0], "/resume_memory_occupation", ["weights", "kv_cache"])
    assert all(torch.equal(kept[n], t) for n, t in server_weights(mock[0]).items())


def _config(url: str, model_dir, **sglang):
    return load_config(None, {
        "model": {"hf_path": str(model_dir)}, "data": {"train_files": ["unused.jsonl"]},
        "reward": {"functions": [{"name": "copy"}]},
        "rollout": {"engine": "sglang", "sglang": {
            "urls": [url], "weight_sync": "tensor", "bucket_mb": SMALL_BUCKET_MB, "sync_changed_only": True,
            "gpu_servers": True, "probe_on_gpu_servers": True, "probe_tolerance": 1e-4, **sglang}}})


def test_the_push_after_a_release_without_cpu_backup_is_full(mock_gpu_config_url, tiny_hf_dir, dist_world1):
    url, model_dir = mock_gpu_config_url, tiny_hf_dir("qwen3_moe")
    cfg = _config(url, model_dir)
    model = build_loaded_policy(model_dir, ParallelLayout())
    params = dict(model.unwrapped()[0].named_parameters())
    engine = make_engine(cfg.rollout, cfg.model.hf_path, cfg.train.seed, torch.float32)
    push = WeightPush(cfg.rollout, cfg.model.hf_path, engine)
    try:
        push.run(model, 1)
        release_rollout_memory(engine)  # the trainer trains; the server's weights are gone
        with torch.no_grad():
            params["decoder.layers.0.self_attention.linear_proj.weight"].view(-1)[0] += 0.5
        before = len(weight_updates(url))
        push.run(model, 2)  # the probe (tolerance 1e-4) raises if any tensor is left as garbage
        weights = sorted(export_hf_weights(model))
        assert_holds(server_weights(url), weights)
        assert {n for u in weight_updates(url)[before:] for n in u["names"]} == {n for n, _ in weights}
        assert engine.last_sync["full"] == 1.0 and engine.last_sync["probe_max_abs_diff"] < 1e-4
        with pytest.raises(RuntimeError, match="without CPU backup"):  # a caller that skips the check
            release_rollout_memory(engine)
            engine.push_buckets(iter(()), 3, complete=False)
    finally:
        engine.shutdown()


@pytest.mark.parametrize("backup", [True, False])
def test_only_servers_with_cpu_backup_keep_changed_only_pushes_after_a_release(mock, tiny_hf_dir, backup):
    cfg = _config(mock[0], tiny_hf_dir("qwen3_moe"), weights_cpu_backup=backup, probe_tokens=0)
    engine = make_engine(cfg.rollout, cfg.model.hf_path, cfg.train.seed, torch.float32)
    try:
        engine.update_weights(sorted(server_weights(mock[0]).items()), version=5)
        assert engine.serves_last_push()
        engine.release_memory()
        assert engine.serves_last_push() == backup
        engine.update_weights(sorted(server_weights(mock[0]).items()), version=6)  # resumes, full push
        assert engine.serves_last_push()
    finally:
        engine.shutdown()
