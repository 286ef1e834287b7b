"""Weight sync in the three modes against mock SGLang servers: session envelope, version, and new weights served."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from grpo_megatron.rollout.engines.base import SamplingParams
from grpo_megatron.rollout.engines.embedded import EmbeddedEngine
from grpo_megatron.rollout.sglang import (
    DiskSync, DistributedSync, ProbeCheck, ProbeMismatchError, RetryPolicy, SGLangEngine, ServerPool,
    ServerRequestError, ServerUnavailableError, TensorSync,
)
from grpo_megatron.models.weight_stream import pack
from grpo_megatron.rollout.sglang.tensor_sync import _pickle, _shared_alloc
from grpo_megatron.rollout.sglang.weight_sync import ReusedBuffers
from grpo_megatron.parallel import free_port
from tests.conftest import REPO
from tests.sglang.conftest import mock_servers, request_log, server_weights, weight_updates

PROBE = list(range(1, 17))
MODES = ["tensor", "distributed", "disk"]
SMALL_BUCKET_MB = 1 / 16  # 64 KiB: the tiny model (0.32 MiB) travels in several buckets


def new_weights(model_dir, seed: int) -> list[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors, perturbed, so served outputs change detectably."""
    tensors = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    gen = torch.Generator().manual_seed(seed)
    return [(n, t + 0.05 * torch.randn(t.shape, generator=gen)) for n, t in sorted(tensors.items())]


def make_sync(mode: str, pool: ServerPool, model_dir, bucket_mb: float = 1, tp_size: int = 1):
    if mode == "tensor":
        return TensorSync(pool, bucket_mb=bucket_mb, tp_size=tp_size)
    if mode == "distributed":
        return DistributedSync(pool, bucket_mb=bucket_mb, tp_size=tp_size, master_address="127.0.0.1",
                               master_port=free_port(), backend="gloo")
    return DiskSync(pool, bucket_mb=bucket_mb, hf_path=model_dir, disk_dir=None)


def assert_holds(held: dict[str, torch.Tensor], weights: list[tuple[str, torch.Tensor]]) -> None:
    """The server rank holds exactly the trainer's tensors, bit for bit."""
    assert sorted(held) == sorted(n for n, _ in weights)
    for name, tensor in weights:
        assert held[name].dtype == tensor.dtype and torch.equal(held[name], tensor), name


@pytest.mark.parametrize("mode", MODES)
def test_sync_then_generation_uses_new_weights(mode, mock, tiny_hf_dir):
    model_dir = tiny_hf_dir("qwen3_moe")
    pool = ServerPool(mock, retry=RetryPolicy(attempts=2, backoff_s=0.05))
    probe = ProbeCheck(model_dir, PROBE, tolerance=1e-4)
    # several buckets: the sender refills its two buffers, which the probe must not see change
    engine = SGLangEngine(pool, make_sync(mode, pool, model_dir, bucket_mb=SMALL_BUCKET_MB), probe=probe)
    weights = new_weights(model_dir, seed=hash(mode) % 1000)
    try:
        engine.update_weights(weights, version=7)
        assert engine.last_sync["probe_max_abs_diff"] < 1e-4
        assert engine.last_sync["bytes"] == sum(t.numel() * t.element_size() for _, t in weights)
        for url in mock:
            log = request_log(url)
            route = {"tensor": "/update_weights_from_tensor", "distributed": "/update_weights_from_distributed",
                     "disk": "/update_weights_from_disk"}[mode]
            first, last = log.index("/begin_weight_update"), log.index("/end_weight_update")
            assert first < log.index(route) and max(i for i, p in enumerate(log) if p == route) < last
            # The cache is flushed exactly once, by the last update request, not by a slow separate call.
            assert log.count("(flush_cache in update)") == 1 and "/flush_cache" not in log
            assert log.index(route) < log.index("(flush_cache in update)") < last
        params = SamplingParams(max_new_tokens=4, temperature=0.0)
        reference = EmbeddedEngine(model_dir)
        reference.update_weights(weights, version=7)
        expected = reference.generate([[1, 2, 3]], params)[0][0]
        got = engine.generate([[1, 2, 3]], params)[0][0]
        assert got.response_ids == expected.response_ids and got.weight_version == 7
        assert got.response_logprobs == pytest.approx(expected.response_logprobs, abs=1e-4)
    finally:
        engine.shutdown()


def test_probe_reports_a_server_that_missed_the_weights(mock, tiny_hf_dir):
    """A reference given other weights than the server's must trip the tolerance."""
    model_dir = tiny_hf_dir("qwen3_moe")
    pool = ServerPool(mock[:1])
    probe = ProbeCheck(model_dir, PROBE, tolerance=1e-4)
    with pytest.raises(ProbeMismatchError, match=mock[0]):
        probe.run(pool, new_weights(model_dir, seed=123), version=1)


def test_a_push_may_leave_its_probe_for_later_and_the_probe_runs_once(mock, tiny_hf_dir):
    """verify=False (background rollouts): the push ends without the probe's /generate; verify_push runs it
    against what that push sent, once."""
    model_dir = tiny_hf_dir("qwen3_moe")
    pool = ServerPool(mock[:1])
    engine = SGLangEngine(pool, make_sync("tensor", pool, model_dir), probe=ProbeCheck(model_dir, PROBE, 1e-4))
    try:
        engine.push_buckets(pack(new_weights(model_dir, seed=3), engine.sync.bucket_bytes), version=1, verify=False)
        assert "probe_max_abs_diff" not in engine.last_sync and "/generate" not in request_log(mock[0])
        engine.verify_push()
        engine.verify_push()
        assert engine.last_sync["probe_max_abs_diff"] < 1e-4 and request_log(mock[0]).count("/generate") == 1
    finally:
        engine.shutdown()


def test_reused_buffers_alternate_two_cpu_buffers_and_grow():
    made = []

    def make(nbytes, device):
        made.append(nbytes)
        return torch.empty(nbytes, dtype=torch.uint8, device=device)

    buffers = ReusedBuffers(make)
    cpu = torch.device("cpu")
    first, second, third = buffers(100, cpu), buffers(80, cpu), buffers(60, cpu)
    assert third.data_ptr() == first.data_ptr() != second.data_ptr() and third.numel() == 60
    assert buffers(200, cpu).numel() == 200 and made == [100, 80, 200]  # slot 2 grew, slot 1 kept
    assert buffers(10, torch.device("meta")).device.type == "meta" and made[-1] == 10  # not CPU: made fresh
    buffers.release()
    buffers(10, cpu)
    assert made[-1] == 10


def test_buckets_respect_the_size_limit():
    tensors = [(str(i), torch.zeros(256)) for i in range(10)]  # 1 KiB each
    packed = list(pack(tensors, 3 * 1024))
    assert [len(b.names) for b in packed] == [3, 3, 3, 1]
    assert [b.last for b in packed] == [False, False, False, True]
    assert [len(b.names) for b in pack([("big", torch.zeros(4096))], 1024)] == [1]


def test_config_of_written_checkpoint_is_copied(tiny_hf_dir, tmp_path, mock):
    model_dir = tiny_hf_dir("qwen3_moe")
    sync = DiskSync(ServerPool(mock[:1]), 1, model_dir, tmp_path)
    sync.write_checkpoint(pack(new_weights(model_dir, 0), sync.bucket_bytes), tmp_path / "ck")
    assert AutoConfig.from_pretrained(tmp_path / "ck").model_type == "qwen3_moe"


def test_tensor_sync_leaves_no_process_holding_the_trainers_output(mock, tiny_hf_dir):
    """torch's shm daemon outlives the trainer while the server maps its tensors; it must not keep our stdout."""
    script = textwrap.dedent(f"""
        from grpo_megatron.process_setup import share_cpu_tensors_by_name
        from grpo_megatron.rollout.sglang import ServerPool, TensorSync
        from tests.sglang.test_weight_sync import new_weights
        from pathlib import Path
        share_cpu_tensors_by_name()  # what the entry point does for weight_sync: tensor
        sync = TensorSync(ServerPool([{mock[0]!r}]), bucket_mb=1, tp_size=1)
        print("pushed", sync.push(new_weights(Path({str(tiny_hf_dir("qwen3_moe"))!r}), seed=3), 1), flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("pushed ")


def test_a_bucket_travels_as_views_of_one_shared_buffer():
    """Mixed dtypes/shapes come back exact, all mapping one shared storage (one shm registration per bucket);
    a tensor whose offset would not be a multiple of its element size starts the next bucket (SGLang's
    flattened-bucket layout has no padding)."""
    import base64
    from multiprocessing.reduction import ForkingPickler

    torch.multiprocessing.set_sharing_strategy("file_system")
    tensors = [("a", torch.randn(3, 5)), ("b", torch.randn(2).to(torch.bfloat16)), ("c", torch.arange(5)),
               ("d", torch.randn(2, 3, 4).double()), ("e", torch.tensor(1.5)), ("f", torch.randn(3).half()),
               ("g", torch.randn(2))]
    packed = list(pack(tensors, 1 << 20, _shared_alloc))
    assert [b.names for b in packed] == [["a", "b", "c", "d", "e", "f"], ["g"]]  # g at byte 306: not 4-aligned
    loaded = [entry for b in packed for entry in ForkingPickler.loads(base64.b64decode(_pickle(b.tensors())))]
    assert [n for n, _ in loaded] == [n for n, _ in tensors]
    for (_, want), (_, got) in zip(tensors, loaded):
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
    assert len({t.untyped_storage().data_ptr() for _, t in loaded[:6]}) == 1
    assert all(t.is_shared() for _, t in loaded)


@pytest.mark.parametrize("mode", MODES)
def test_a_model_of_several_buckets_arrives_whole(mode, mock, tiny_hf_dir):
    """Every bucket reaches every server; only the last request sets the version and flushes the cache.

    The mock loads each request at once and records its fields, as SGLang's scheduler applies each
    update_weights_from_* on arrival (sglang/srt/managers/scheduler_components/weight_updater.py).
    """
    model_dir = tiny_hf_dir("qwen3_moe")
    sync = make_sync(mode, ServerPool(mock), model_dir, bucket_mb=SMALL_BUCKET_MB)
    weights = new_weights(model_dir, seed=11)
    count = len(list(pack(weights, sync.bucket_bytes, dry=True)))
    assert count >= 3
    try:
        sync.push(new_weights(model_dir, seed=10), version=8)  # the buffers refilled below held these
        seen = {url: (len(weight_updates(url)), request_log(url).count("(flush_cache in update)")) for url in mock}
        sync.push(weights, version=9)
        requests = 1 if mode == "disk" else count
        for url in mock:
            assert_holds(server_weights(url), weights)
            updates = weight_updates(url)[seen[url][0]:]
            assert [u["weight_version"] for u in updates] == [None] * (requests - 1) + ["9"]
            assert [u["flush_cache"] for u in updates] == [False] * (requests - 1) + [True]
            sent = [n for u in updates for n in u["names"]]
            assert sorted(sent) == sorted(n for n, _ in weights) and not any(u["ignored"] for u in updates)
            assert request_log(url).count("(flush_cache in update)") == seen[url][1] + 1
        if mode == "disk":
            index = (sync.root / "v9" / "model.safetensors.index.json").read_text()
            assert len(set(json.loads(index)["weight_map"].values())) == count
    finally:
        sync.close()


@pytest.mark.parametrize("mode", ["tensor", "distributed"])
def test_every_tp_rank_of_every_server_gets_the_weights(mode, mock_tp2, tiny_hf_dir):
    """Servers of TP 2: rank r reads serialized_named_tensors[r] (sglang tp_worker.deserialize_own_rank) and joins
    the update group as rank_offset + r (model_runner weight_updater.init_weights_update_group)."""
    model_dir = tiny_hf_dir("qwen3_moe")
    sync = make_sync(mode, ServerPool(mock_tp2), model_dir, bucket_mb=SMALL_BUCKET_MB, tp_size=2)
    weights = new_weights(model_dir, seed=12)
    try:
        sync.push(weights, version=4)
        for url in mock_tp2:
            for rank in (0, 1):
                assert_holds(server_weights(url, rank), weights)
    finally:
        sync.close()


def test_each_server_tp_rank_gets_its_own_pickle_of_a_bucket(monkeypatch):
    """A pickling takes one reference on the shared buffer and each rank's unpickling drops one
    (torch.multiprocessing.reductions; CUDA IPC counts the same way), so every rank of every server needs its own
    pickle (test_a_model_of_several_buckets_arrives_whole[tensor] shows the second server failing otherwise)."""
    increfs = []
    incref = torch.UntypedStorage._shared_incref
    monkeypatch.setattr(torch.UntypedStorage, "_shared_incref", lambda self: increfs.append(1) or incref(self))
    posted = []

    class RecordingPool:
        urls = ["http://127.0.0.1:1", "http://localhost:2"]  # tensor mode needs servers on this host

        def call(self, url, method, path, payload, timeout_s=None, retry=True):
            posted.append(payload)

    sync = TensorSync(RecordingPool(), bucket_mb=SMALL_BUCKET_MB, tp_size=3)
    tensors = [(str(i), torch.randn(64, 256)) for i in range(2)]  # 64 KiB each: two buckets
    sync.transfer(pack(tensors, sync.bucket_bytes, sync.alloc), "1")
    assert [len(p["serialized_named_tensors"]) for p in posted] == [3] * 4  # 2 buckets x 2 servers
    assert len(increfs) == 12


def test_a_server_given_fewer_payloads_than_tp_ranks_dies(tiny_hf_dir):
    """SGLang's rank 1 indexes a one-entry list, an IndexError its scheduler does not catch: the server exits."""
    with mock_servers(tiny_hf_dir("qwen3_moe"), 1, tp_size=2) as (urls, procs):
        pool = ServerPool(urls, retry=RetryPolicy(attempts=2, backoff_s=0.05))
        pool.call(urls[0], "POST", "/begin_weight_update", {})
        bucket = next(pack([("model.norm.weight", torch.ones(8))], 1 << 20, _shared_alloc))
        payload = {"serialized_named_tensors": [_pickle(bucket.tensors())]}
        with pytest.raises(ServerUnavailableError):
            pool.call(urls[0], "POST", "/update_weights_from_tensor", payload)
        assert procs[0].wait(10) == 1
        assert "Scheduler hit an exception: update_weights_from_tensor: IndexError" in procs[0].stderr.read().decode()


def test_a_misshaped_tensor_fails_its_own_request(mock, tiny_hf_dir, tmp_path):
    """The update is loaded when it arrives: a bad one answers 400 itself and, from disk, leaves the weights."""
    model_dir = tiny_hf_dir("qwen3_moe")
    before = server_weights(mock[0])
    sync = DiskSync(ServerPool(mock[:1]), 1, model_dir, tmp_path)
    weights = [(n, t[:1] if n == "model.norm.weight" else t) for n, t in new_weights(model_dir, seed=5)]
    with pytest.raises(ServerRequestError, match="Failed to update weights: model.norm.weight"):
        sync.push(weights, version=3)
    assert_holds(server_weights(mock[0]), sorted(before.items()))
