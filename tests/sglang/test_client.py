"""The SGLang client against mock SGLang servers: generation format, balancing, retries and fault cases."""
from __future__ import annotations

import threading
import time

import httpx
import pytest
import torch
from transformers import AutoConfig

from grpo_megatron.rollout.engines.base import SamplingParams
from grpo_megatron.rollout.sglang import (
    MalformedResponseError, RetryPolicy, SGLangEngine, ServerPool, ServerRequestError, ServerTimeoutError,
    ServerUnavailableError, TensorSync,
)
from grpo_megatron.parallel import free_port
from tests.sglang.conftest import inject, request_log, running_requests, server_weights, set_token_delay

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
            # "stop" ends on the end-of-sequence token, the 6th one too; "length" only at the 6th
            stopped = c.response_ids[-1:] == [config.eos_token_id]
            assert c.finish_reason == ("stop" if stopped else "length") and (stopped or len(c.response_ids) == 6)
            assert c.routed_experts.dtype == torch.uint8  # compact: the tiny model has 4 experts
            assert c.routed_experts.shape == (len(prompt) + len(c.response_ids) - 1, config.num_hidden_layers,
                                              config.num_experts_per_tok)


def test_greedy_logprobs_match_the_model(mock, tiny_hf_dir):
    """The parsed numbers are the model's: greedy responses and log-probs equal an in-process engine's holding
    the weights the server holds (earlier tests may have pushed others to the shared mock servers)."""
    from grpo_megatron.rollout.engines.embedded import EmbeddedEngine

    engine = make_engine(mock[:1], tiny_hf_dir)
    params = SamplingParams(max_new_tokens=5, temperature=0.0)
    reference = EmbeddedEngine(tiny_hf_dir("qwen3_moe"))
    reference.update_weights(sorted(server_weights(mock[0]).items()), version=1)
    ref = reference.generate(PROMPTS, params)
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
    assert request_log(mock[0]).count("/generate") == 4  # one request per sample, each failed once


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


def test_a_generation_that_keeps_timing_out_is_a_clear_error(mock, tiny_hf_dir):
    inject(mock[0], "/generate", "hang", count=FAST.attempts, seconds=3)
    engine = make_engine(mock[:1], tiny_hf_dir, timeout_s=1.0)
    with pytest.raises(ServerUnavailableError, match="no answer within 1.0s"):
        engine.generate([[1, 2]], SamplingParams(max_new_tokens=2))


def test_a_control_request_timeout_is_not_repeated(mock):
    inject(mock[0], "/flush_cache", "hang", seconds=3)
    with pytest.raises(ServerTimeoutError, match=mock[0]):
        ServerPool(mock[:1], timeout_s=1.0, retry=FAST).call(mock[0], "POST", "/flush_cache")


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


def test_a_pool_makes_its_tls_context_once(mock, tiny_hf_dir, monkeypatch):
    """Control calls and generate make an HTTP client each; the CA bundle behind their TLS context is loaded
    once per pool (each load cost ~17 ms of the trainer's CPU, several times per weight push)."""
    made = []
    create = httpx.create_ssl_context
    monkeypatch.setattr(httpx, "create_ssl_context", lambda *a, **k: made.append(1) or create(*a, **k))
    engine = make_engine(mock[:1], tiny_hf_dir)
    engine.pause_generation()
    engine.continue_generation()
    engine.generate(PROMPTS, SamplingParams(max_new_tokens=2))
    assert len(made) == 1


def test_memory_release_is_skipped_on_cpu(mock, tiny_hf_dir):
    engine = make_engine(mock[:1], tiny_hf_dir)
    engine.release_memory()
    assert not any("memory_occupation" in entry for entry in request_log(mock[0]))


def test_sglang_error_body_message_is_reported(mock):
    r = httpx.post(mock[0] + "/generate", json={"sampling_params": {}})
    assert r.status_code == 400 and "input_ids" in r.json()["error"]["message"]


def _in_thread(fn) -> tuple[threading.Thread, list]:
    box: list = []
    thread = threading.Thread(target=lambda: box.append(fn()))
    thread.start()
    return thread, box


def _wait_running(url: str, count: int = 1) -> None:
    deadline = time.monotonic() + 30
    while running_requests(url) < count:
        assert time.monotonic() < deadline, "the generation never started"
        time.sleep(0.05)


def _raw_generate(url: str, max_new_tokens: int = 8) -> dict:
    body = {"input_ids": [1, 2, 3], "return_logprob": True,
            "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0.0}}
    return httpx.post(url + "/generate", json=body, timeout=60).json()


def test_an_aborted_request_answers_200_with_its_tokens_so_far(mock):
    """SGLang's abort_all marks running requests FINISH_ABORT() (sglang/srt/managers/scheduler.py abort_request);
    a non-streaming one answers 200 with the tokens it has and that finish_reason (schedule_batch.py)."""
    set_token_delay(mock[0], 0.2)
    thread, box = _in_thread(lambda: _raw_generate(mock[0]))
    _wait_running(mock[0])
    httpx.post(mock[0] + "/abort_request", json={"rid": "", "abort_all": True}).raise_for_status()
    thread.join(30)
    meta = box[0]["meta_info"]
    assert meta["finish_reason"] == {"type": "abort", "message": "Aborted", "status_code": None, "err_type": None}
    assert len(box[0]["output_ids"]) < 8 and len(meta["output_token_logprobs"]) == len(box[0]["output_ids"])


def test_pause_in_abort_mode_aborts_running_requests_and_they_are_resubmitted(mock, tiny_hf_dir, caplog):
    """/pause_generation's default mode "abort" aborts what runs and returns once all answered; new requests wait
    until /continue_generation (sglang/srt/managers/tokenizer_manager.py pause_generation, generate_request)."""
    engine = make_engine(mock[:1], tiny_hf_dir)
    set_token_delay(mock[0], 0.2)
    params = SamplingParams(max_new_tokens=8, temperature=1.0, n=2)
    thread, box = _in_thread(lambda: engine.generate([[1, 2, 3]], params))
    _wait_running(mock[0], count=2)  # one request per sample
    engine.pause_generation()
    assert running_requests(mock[0]) == 0
    thread.join(1.0)
    assert thread.is_alive()  # the resubmitted request waits while the server is paused
    engine.continue_generation()
    thread.join(60)
    group = box[0][0]
    assert len(group) == 2 and all(c.finish_reason in ("stop", "length") for c in group)
    assert all(len(c.response_ids) == 8 or c.finish_reason == "stop" for c in group)
    assert request_log(mock[0]).count("/generate") == 4 and "aborted" in caplog.text


@pytest.mark.parametrize("mode", ["retract", "in_place"])
def test_pause_that_keeps_requests_holds_them_until_continue(mode, mock, tiny_hf_dir, tmp_path):
    """retract and in_place stop the scheduler without aborting (scheduler.py pause_generation); an update then
    flushes the cache after a retract but not in place, where requests still run (flush_cache_after_weight_update)."""
    from grpo_megatron.models.weight_stream import pack
    from grpo_megatron.rollout.sglang import DiskSync
    from tests.sglang.test_weight_sync import new_weights

    model_dir = tiny_hf_dir("qwen3_moe")
    sync = DiskSync(ServerPool(mock[:1]), 1, model_dir, tmp_path)
    sync.write_checkpoint(pack(new_weights(model_dir, 0), sync.bucket_bytes), tmp_path / "ck")
    set_token_delay(mock[0], 0.2)
    thread, box = _in_thread(lambda: _raw_generate(mock[0]))
    _wait_running(mock[0])
    httpx.post(mock[0] + "/pause_generation", json={"mode": mode}).raise_for_status()
    thread.join(1.0)
    assert thread.is_alive()
    update = httpx.post(mock[0] + "/update_weights_from_disk", json={"model_path": str(tmp_path / "ck")}, timeout=60)
    if mode == "retract":
        assert update.status_code == 200
    else:
        assert update.status_code == 400 and "cache was not flushed" in update.json()["message"]
    httpx.post(mock[0] + "/continue_generation", json={}).raise_for_status()
    thread.join(30)
    assert box[0]["meta_info"]["finish_reason"]["type"] in ("stop", "length")
