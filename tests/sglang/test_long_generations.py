"""Long generations: a /generate's bound grows with max_new_tokens, a timed-out generation is aborted on its server
and sent again with the same seed (no duplicate sample), and /update_weights_from_disk has a bound of its own.
Against the mock server, with its decoding paced to a few tenths of a second per token."""
from __future__ import annotations

import httpx
import pytest

from grpo_megatron.rollout.engines.base import SamplingParams
from grpo_megatron.rollout.sglang import RetryPolicy, SGLangEngine, ServerPool, ServerTimeoutError, TensorSync
from grpo_megatron.rollout.sglang.disk_sync import DiskSync
from grpo_megatron.models.weight_stream import pack
from tests.sglang.conftest import inject, request_log, server_weights, set_token_delay

FAST = RetryPolicy(attempts=3, backoff_s=0.05)


def _engine(url: str, timeout_s: float, per_token_s: float) -> SGLangEngine:
    pool = ServerPool([url], timeout_s=timeout_s, retry=FAST)
    return SGLangEngine(pool, TensorSync(pool, 64, tp_size=1), max_in_flight=2, timeout_per_token_s=per_token_s)


def test_the_generate_bound_grows_with_max_new_tokens(mock):
    set_token_delay(mock[0], 0.3)  # 6 tokens: >= 1.8 s, past the 1 s a control request gets
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    with pytest.raises(Exception, match="no answer within 1.0s"):
        _engine(mock[0], timeout_s=1.0, per_token_s=0.0).generate([[1, 2]], params)
    out = _engine(mock[0], timeout_s=1.0, per_token_s=1.0).generate([[1, 2]], params)
    assert len(out[0][0].response_ids) >= 1


def test_a_timed_out_generation_is_aborted_and_redrawn_once_with_its_seed(mock):
    engine = _engine(mock[0], timeout_s=1.0, per_token_s=0.0)
    params = SamplingParams(max_new_tokens=4, temperature=1.0, n=2, seed=77)
    expected = [[c.response_ids for c in group] for group in engine.generate([[1, 2, 3]], params)]
    before = request_log(mock[0]).count("/generate")
    inject(mock[0], "/generate", "hang", seconds=2)
    got = [[c.response_ids for c in group] for group in engine.generate([[1, 2, 3]], params)]
    assert got == expected  # two samples, each its own draw: the retried one is not a second copy
    log = request_log(mock[0])
    assert log.count("/generate") - before == 3 and "/abort_request" in log


def test_disk_updates_have_their_own_bound(mock, tiny_hf_dir, tmp_path):
    model_dir = tiny_hf_dir("qwen3_moe")
    weights = sorted(server_weights(mock[0]).items())
    inject(mock[0], "/update_weights_from_disk", "hang", seconds=1.5)
    short = DiskSync(ServerPool(mock[:1], timeout_s=0.5, retry=FAST), 64, model_dir, tmp_path / "a")
    with pytest.raises(ServerTimeoutError):
        short.push_buckets(pack(weights, short.bucket_bytes), 1)
    httpx.post(mock[0] + "/end_weight_update", json={}, timeout=30)  # the session the timed-out push left open
    inject(mock[0], "/update_weights_from_disk", "hang", seconds=1.5)
    own = DiskSync(ServerPool(mock[:1], timeout_s=0.5, retry=FAST), 64, model_dir, tmp_path / "b", load_timeout_s=30)
    own.push_buckets(pack(weights, own.bucket_bytes), 2)
    assert httpx.get(mock[0] + "/model_info").json()["weight_version"] == "2"
