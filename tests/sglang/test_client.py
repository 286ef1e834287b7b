"""The SGLang client against mock SGLang servers: generation format, balancing, retries and fault cases."""
from __future__ import annotations

import httpx
import pytest
import torch
from transformers import AutoConfig

from grpo_megatron.rollout.base import SamplingParams
from grpo_megatron.rollout.sglang import (
    MalformedResponseError, RetryPolicy, SGLangEngine, ServerPool, ServerRequestError, ServerTimeoutError,
    ServerUnavailableError, TensorSync,
)
from grpo_megatron.parallel import free_port
from tests.sglang.conftest import inject, request_log

FAST = RetryPolicy(attempts=3, backoff_s=0.05)
PROMPTS = [[1, 5, 9, 2], [3, 4]]


def make_engine(urls, tiny_hf_dir, timeout_s=60.0, retry=FAST) -> SGLangEngine:
    config = AutoConfig.from_pretrained(tiny_hf_dir("qwen3_moe"))
    pool = ServerPool(urls, timeout_s=timeout_s, retry=retry)
    return SGLangEngine(pool, TensorSync(pool, 64, tp_size=1), max_in_flight=4,
                        routed_shape=(config.num_hidden_layers, config.num_experts_per_tok))


def test_generate_parses_logprobs_finish_reason_and_routed_experts(mock, tiny_hf_dir):
    engine = make_engine(mock[:1], tiny_hf_dir)
    params = SamplingParams(max_new_tokens=6, n=3, temperature=1.0)
    out = engine.generate(PROMPTS, params, return_routed_experts=True)
    assert [len(group) for group in out] == [3, 3]
    config = AutoConfig.from_pretrained(tiny_hf_dir("qwen3_moe"))
    for prompt, group in zip(PROMPTS, out):
        for c in group:
            assert c.prompt_ids == prompt and len(c.response_logprobs) == len(c.response_ids) <= 6
            assert all(lp <= 0 for lp in c.response_logprobs)
            assert c.finish_reason == ("length" if len(c.response_ids) == 6 else "stop")
            assert c.routed_experts.dtype == torch.int32
            assert c.routed_experts.shape == (len(prompt) + len(c.response_ids) - 1, config.num_hidden_layers,
                                              config.num_experts_per_tok)


def test_greedy_logprobs_match_the_model(mock, tiny_hf_dir):
    """The parsed numbers are the model's: greedy responses and log-probs equal an in-process engine's."""
    from grpo_megatron.rollout.embedded import EmbeddedEngine

    engine = make_engine(mock[:1], tiny_hf_dir)
    params = SamplingParams(max_new_tokens=5, temperature=0.0)
    ref = EmbeddedEngine(tiny_hf_dir("qwen3_moe")).generate(PROMPTS, params)
    got = engine.generate(PROMPTS, params)
    for r, g in zip(ref, got):
        assert g[0].response_ids == r[0].response_ids
        assert g[0].response_logprobs == pytest.approx(r[0].response_logprobs, abs=1e-5)


def test_requests_are_balanced_over_servers(mock, tiny_hf_dir):
    engine = make_engine(mock, tiny_hf_dir)
    engine.generate([[1, 2, 3]] * 8, SamplingParams(max_new_tokens=2))
    counts = [request_log(url).count("/generate") for url in mock]
    assert sum(counts) == 8 and min(counts) >= 2


def test_5xx_and_dropped_connections_are_retried_without_duplicates(mock, tiny_hf_dir):
    inject(mock[0], "/generate", "500")
    inject(mock[0], "/generate", "drop")
    engine = make_engine(mock[:1], tiny_hf_dir)
    out = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2, n=2))
    assert len(out) == 1 and len(out[0]) == 2
    assert request_log(mock[0]).count("/generate") == 3


def test_failed_server_fails_over_to_the_other(mock, tiny_hf_dir):
    dead = f"http://127.0.0.1:{free_port()}"
    engine = make_engine([dead, mock[0]], tiny_hf_dir)
    out = engine.generate([[1, 2]] * 4, SamplingParams(max_new_tokens=2))
    assert len(out) == 4


def test_server_that_stays_down_names_its_url(tiny_hf_dir):
    dead = f"http://127.0.0.1:{free_port()}"
    engine = make_engine([dead], tiny_hf_dir)
    with pytest.raises(ServerUnavailableError, match=dead):
        engine.generate([[1, 2]], SamplingParams(max_new_tokens=2))
    with pytest.raises(ServerUnavailableError, match=dead):
        engine.pool.call(dead, "POST", "/flush_cache")


def test_timeout_is_a_clear_error(mock, tiny_hf_dir):
    inject(mock[0], "/generate", "hang")
    engine = make_engine(mock[:1], tiny_hf_dir, timeout_s=1.0)
    with pytest.raises(ServerTimeoutError, match=mock[0]):
        engine.generate([[1, 2]], SamplingParams(max_new_tokens=2))


def test_malformed_json_is_a_clear_error(mock, tiny_hf_dir):
    inject(mock[0], "/generate", "malformed")
    with pytest.raises(MalformedResponseError, match="not valid JSON"):
        make_engine(mock[:1], tiny_hf_dir).generate([[1, 2]], SamplingParams(max_new_tokens=2))


def test_wrong_size_routed_experts_is_a_clear_error(mock, tiny_hf_dir):
    inject(mock[0], "/generate", "routed_experts_size")
    with pytest.raises(MalformedResponseError, match="routed_experts has 3 values"):
        make_engine(mock[:1], tiny_hf_dir).generate([[1, 2]], SamplingParams(max_new_tokens=2), True)


def test_400_is_not_retried(mock, tiny_hf_dir):
    pool = ServerPool(mock[:1], retry=FAST)
    with pytest.raises(ServerRequestError, match="HTTP 400"):
        pool.call(mock[0], "POST", "/update_weights_from_tensor", {"serialized_named_tensors": ["x"]})
    assert request_log(mock[0]).count("/update_weights_from_tensor") == 1


def test_pause_blocks_and_continue_resumes_generation(mock, tiny_hf_dir):
    import threading

    engine = make_engine(mock[:1], tiny_hf_dir)
    engine.pause_generation()
    result = []
    worker = threading.Thread(target=lambda: result.append(engine.generate([[1, 2]], SamplingParams(max_new_tokens=2))))
    worker.start()
    worker.join(1.0)
    assert worker.is_alive() and not result
    engine.continue_generation()
    worker.join(30)
    assert len(result) == 1


def test_memory_release_is_skipped_on_cpu(mock, tiny_hf_dir, caplog):
    engine = make_engine(mock[:1], tiny_hf_dir)
    with caplog.at_level("INFO"):
        engine.release_memory()
        engine.resume_memory()
    assert "GPU-only" in caplog.text
    assert "/release_memory_occupation" not in request_log(mock[0])


def test_sglang_error_body_message_is_reported(mock):
    r = httpx.post(mock[0] + "/generate", json={"sampling_params": {}})
    assert r.status_code == 400 and "input_ids" in r.json()["error"]["message"]
