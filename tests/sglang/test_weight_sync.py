"""Weight sync in the three modes against mock SGLang servers: session envelope, version, and new weights served."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from grpo_megatron.rollout.base import SamplingParams
from grpo_megatron.rollout.embedded import EmbeddedEngine
from grpo_megatron.rollout.sglang import (
    DiskSync, DistributedSync, ProbeCheck, ProbeMismatchError, RetryPolicy, SGLangEngine, ServerPool, TensorSync,
)
from grpo_megatron.rollout.sglang.weight_sync import _serialize, buckets
from grpo_megatron.parallel import free_port
from tests.conftest import REPO
from tests.sglang.conftest import request_log

PROBE = list(range(1, 17))


def new_weights(model_dir, seed: int) -> list[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors, perturbed, so served outputs change detectably."""
    tensors = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    gen = torch.Generator().manual_seed(seed)
    return [(n, t + 0.05 * torch.randn(t.shape, generator=gen)) for n, t in sorted(tensors.items())]


def make_sync(mode: str, pool: ServerPool, model_dir):
    if mode == "tensor":
        return TensorSync(pool, bucket_mb=1, tp_size=1)
    if mode == "distributed":
        return DistributedSync(pool, bucket_mb=1, tp_size=1, master_address="127.0.0.1", master_port=free_port(),
                               backend="gloo")
    return DiskSync(pool, bucket_mb=1, hf_path=model_dir, disk_dir=None)


@pytest.mark.parametrize("mode", ["tensor", "distributed", "disk"])
def test_sync_then_generation_uses_new_weights(mode, mock, tiny_hf_dir):
    model_dir = tiny_hf_dir("qwen3_moe")
    pool = ServerPool(mock, retry=RetryPolicy(attempts=2, backoff_s=0.05))
    probe = ProbeCheck(model_dir, PROBE, tolerance=1e-4)
    engine = SGLangEngine(pool, make_sync(mode, pool, model_dir), probe=probe)
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


def test_buckets_respect_the_size_limit():
    tensors = [(str(i), torch.zeros(256)) for i in range(10)]  # 1 KiB each
    sizes = [len(b) for b in buckets(tensors, 3 * 1024)]
    assert sizes == [3, 3, 3, 1]
    assert [len(b) for b in buckets([("big", torch.zeros(4096))], 1024)] == [1]


def test_config_of_written_checkpoint_is_copied(tiny_hf_dir, tmp_path, mock):
    model_dir = tiny_hf_dir("qwen3_moe")
    sync = DiskSync(ServerPool(mock[:1]), 1, model_dir, tmp_path)
    sync.write_checkpoint(new_weights(model_dir, 0), tmp_path / "ck")
    assert AutoConfig.from_pretrained(tmp_path / "ck").model_type == "qwen3_moe"


def test_tensor_sync_leaves_no_process_holding_the_trainers_output(mock, tiny_hf_dir):
    """torch's shm daemon outlives the trainer while the server maps its tensors; it must not keep our stdout."""
    script = textwrap.dedent(f"""
        from grpo_megatron.rollout.sglang import ServerPool, TensorSync
        from tests.sglang.test_weight_sync import new_weights
        from pathlib import Path
        sync = TensorSync(ServerPool([{mock[0]!r}]), bucket_mb=1, tp_size=1)
        print("pushed", sync.push(new_weights(Path({str(tiny_hf_dir("qwen3_moe"))!r}), seed=3), 1), flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("pushed ")


def test_a_bucket_travels_as_views_of_one_shared_buffer():
    """Mixed dtypes/shapes come back exact, all mapping one shared storage (one shm registration per bucket)."""
    import base64
    import io
    from multiprocessing.reduction import ForkingPickler

    torch.multiprocessing.set_sharing_strategy("file_system")
    bucket = [("a", torch.randn(3, 5)), ("b", torch.randn(7).to(torch.bfloat16)), ("c", torch.arange(5)),
              ("d", torch.randn(2, 3, 4).double()), ("e", torch.tensor(1.5))]
    loaded = ForkingPickler.loads(base64.b64decode(_serialize(bucket)))
    assert [n for n, _ in loaded] == [n for n, _ in bucket]
    for (_, want), (_, got) in zip(bucket, loaded):
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
    assert len({t.untyped_storage().data_ptr() for _, t in loaded}) == 1
    assert all(t.is_shared() for _, t in loaded)
