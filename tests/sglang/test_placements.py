"""Weight sync placements against mock servers: colocated tensor mode from every trainer rank (2 gloo processes),
server TP ranks and several servers per update group, the master address, disk mode's directory, refusals of
placements that cannot work, and colocated memory release/resume around the push."""
from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from grpo_megatron.config import ConfigError, SGLangConfig
from grpo_megatron.models.weight_stream import pack
from grpo_megatron.rollout.sglang import DiskSync, DistributedSync, SGLangEngine, ServerPool, TensorSync
from grpo_megatron.rollout.sglang.sync_factory import make_probe, make_weight_sync
from grpo_megatron.rollout.sglang import disk_sync
from grpo_megatron.rollout.sglang.weight_sync import is_local_host, reachable_address
from tests.conftest import run_cli
from tests.sglang.conftest import mock_servers, request_log, server_weights, weight_updates
from tests.sglang.test_weight_sync import assert_holds, new_weights


def _doubled_checkpoint(model_dir) -> list[tuple[str, torch.Tensor]]:
    return sorted((n, 2 * t) for n, t in load_file(model_dir / "model.safetensors").items())


def _push_from_two_ranks(model_dir, urls, sglang: dict, flags: list[str]) -> str:
    config = {"model": {"hf_path": str(model_dir)}, "data": {"train_files": ["unused.jsonl"]},
              "reward": {"functions": [{"name": "copy"}]}, "rollout": {"engine": "sglang", "sglang": {
                  "urls": urls, "bucket_mb": 1 / 16, "probe_tokens": 0, **sglang}}}
    result = run_cli(["tests/sglang/push_worker.py", str(model_dir), json.dumps(config), *flags], nproc=2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout


@pytest.mark.distributed
@pytest.mark.parametrize("servers,tp", [(1, 2), pytest.param(2, 1, marks=pytest.mark.slow)],
                         ids=["one-server-tp2", "two-servers-tp1"])
def test_colocated_tensor_mode_sends_each_server_rank_its_own_copy(servers, tp, tiny_hf_dir):
    """Trainer at TP2 on 2 ranks; server i's TP rank j gets its pickle from trainer rank i*tp + j (its GPU),
    the server's first rank posts them; every server rank ends with exactly the full model."""
    model_dir = tiny_hf_dir("qwen3_moe")
    with mock_servers(model_dir, servers, tp_size=tp) as (urls, _):
        out = _push_from_two_ranks(model_dir, urls, {"weight_sync": "tensor", "colocated": True,
                                                     "server_tp_size": tp}, ["--tp", "2"])
        assert "rank 1 to_every_rank=True" in out
        for url in urls:
            for rank in range(tp):
                assert_holds(server_weights(url, rank), _doubled_checkpoint(model_dir))
            updates = weight_updates(url)
            assert len(updates) >= 3 and [u["weight_version"] for u in updates][-1] == "5"
            log = request_log(url)
            assert log.count("/begin_weight_update") == log.count("/end_weight_update") == 1
            assert log.index("/end_weight_update") > max(i for i, p in enumerate(log)
                                                         if p == "/update_weights_from_tensor")


@pytest.mark.distributed
@pytest.mark.slow  # 2 torchrun ranks + 2 TP2 mock servers per mode; the modes' buckets: tests/sglang/test_weight_sync.py
@pytest.mark.parametrize("mode", ["distributed", "disk"])
def test_rank0_modes_from_a_sharded_trainer(mode, tiny_hf_dir, tmp_path):
    """EP2 trainer; buckets reach rank 0 only, which pushes to two TP2 servers (one group of world 5)."""
    model_dir = tiny_hf_dir("qwen3_moe")
    with mock_servers(model_dir, 2, tp_size=2) as (urls, _):
        _push_from_two_ranks(model_dir, urls, {"weight_sync": mode, "server_tp_size": 2, "update_backend": "gloo",
                                               "disk_dir": str(tmp_path / "weights")}, ["--ep", "2"])
        for url in urls:
            for rank in (0, 1):
                assert_holds(server_weights(url, rank), _doubled_checkpoint(model_dir))
    if mode == "disk":
        assert [p.name for p in (tmp_path / "weights").iterdir()] == ["v5"]


def test_distributed_group_spans_every_tp_rank_of_every_server():
    pool = ServerPool(["http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3"])
    sync = DistributedSync(pool, 1, tp_size=4, master_address="", master_port=1, backend="gloo")
    assert sync.group_ranks() == {"http://127.0.0.1:1": 1, "http://127.0.0.1:2": 5, "http://127.0.0.1:3": 9}
    assert sync.master_address.startswith("127.")  # the address on the route to the servers, not a guess


def test_master_address_is_the_one_the_servers_route_to():
    assert reachable_address("http://127.0.0.1:30000").startswith("127.")
    assert is_local_host("http://localhost:1") and not is_local_host("http://no-such-host.invalid:1")


def test_placements_that_cannot_work_are_refused_with_the_fix():
    remote = ["http://no-such-host.invalid:30000"]
    with pytest.raises(ConfigError, match="not on this host.*colocated"):
        make_weight_sync(SGLangConfig(urls=remote, weight_sync="tensor"), "unused")
    with pytest.raises(ConfigError, match="disk_dir to a directory every server node sees"):
        make_weight_sync(SGLangConfig(urls=remote, weight_sync="disk"), "unused")
    with pytest.raises(ConfigError, match="Duplicate GPU.*use weight_sync: tensor"):
        make_weight_sync(SGLangConfig(urls=["http://127.0.0.1:1"], weight_sync="distributed", colocated=True,
                                      update_backend="nccl"), "unused")
    with pytest.raises(ConfigError, match="server_tp_size"):
        make_weight_sync(SGLangConfig(urls=["http://127.0.0.1:1"], server_tp_size=0), "unused")


def test_probe_is_off_for_gpu_servers_unless_asked(tiny_hf_dir):
    model = str(tiny_hf_dir("qwen3_moe"))
    assert make_probe(SGLangConfig(gpu_servers=True), model) is None
    assert make_probe(SGLangConfig(gpu_servers=True, probe_on_gpu_servers=True), model) is not None
    assert make_probe(SGLangConfig(), model) is not None and make_probe(SGLangConfig(probe_tokens=0), model) is None


def test_disk_versions_are_renamed_into_place_and_old_ones_removed(mock, tiny_hf_dir, tmp_path):
    model_dir = tiny_hf_dir("qwen3_moe")
    sync = DiskSync(ServerPool(mock[:1]), 1 / 16, model_dir, tmp_path)
    (tmp_path / ".v3.staging").mkdir()  # left by a trainer killed mid-write
    for version in (3, 4):
        sync.push(new_weights(model_dir, seed=version), version)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v4"]
    assert_holds(server_weights(mock[0]), new_weights(model_dir, seed=4))


def test_disk_mode_defaults_to_memory_and_names_the_fix_when_full(tiny_hf_dir, monkeypatch):
    sync = DiskSync(ServerPool(["http://127.0.0.1:1"]), 1, tiny_hf_dir("qwen3_moe"), None)
    try:
        assert sync.root.parent == Path("/dev/shm")  # this machine has one; elsewhere the system temp dir

        def full(bucket, path):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(disk_sync, "write_safetensors", full)
        with pytest.raises(OSError, match="set rollout.sglang.disk_dir to a directory with space"):
            sync.transfer(pack([("a", torch.ones(4))], 1 << 20), "1")
        assert list(sync.root.iterdir()) == []
    finally:
        sync.close()
    assert not sync.root.exists()


def test_a_failed_disk_write_leaves_no_version_behind(tiny_hf_dir, tmp_path):
    sync = DiskSync(ServerPool(["http://127.0.0.1:1"]), 1, tiny_hf_dir("qwen3_moe"), tmp_path)

    def broken():
        yield from pack([("a", torch.ones(4))], 1 << 20, last=False)
        raise RuntimeError("export failed")

    with pytest.raises(RuntimeError, match="export failed"):
        sync.write_checkpoint(broken(), tmp_path / "v1")
    assert list(tmp_path.iterdir()) == []


def test_colocated_gpu_servers_release_for_training_and_resume_for_the_sync(mock, tiny_hf_dir):
    """Weights come back before the push (the mock, like SGLang, cannot load into released memory), the KV cache
    after it; CPU servers are never asked (SGLang would call torch.cuda)."""
    model_dir = tiny_hf_dir("qwen3_moe")
    pool = ServerPool(mock[:1])
    engine = SGLangEngine(pool, TensorSync(pool, 1, 1), gpu_servers=True)
    engine.release_memory()
    engine.release_memory()  # once is enough
    engine.update_weights(new_weights(model_dir, seed=2), version=1)
    log = request_log(mock[0])
    assert log.count("(release_memory_occupation kv_cache,weights)") == 1
    order = [log.index(e) for e in ("(release_memory_occupation kv_cache,weights)",
                                    "(resume_memory_occupation weights)", "/update_weights_from_tensor",
                                    "(resume_memory_occupation kv_cache)")]
    assert order == sorted(order)
    engine.update_weights(new_weights(model_dir, seed=3), version=2)  # not released: no resume
    assert request_log(mock[0]).count("(resume_memory_occupation weights)") == 1
