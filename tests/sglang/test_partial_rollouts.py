"""Partial rollouts with the SGLang engine against mock servers: a push pauses the servers (mode "abort"), the
aborted samples keep their tokens, log-probs and route rows under the old version, and are resumed (n=1) from
prompt + kept tokens under the new one. The real server's abort answer is checked in tests/sglang_live."""
from __future__ import annotations

import threading
import time

import httpx
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from grpo_megatron.rollout.engines.base import Completion, SamplingParams
from grpo_megatron.rollout.engines.embedded import EmbeddedEngine
from grpo_megatron.rollout.sglang import RetryPolicy, SGLangEngine, ServerPool, TensorSync
from tests.sglang.conftest import request_log, running_requests, set_token_delay
from tests.sglang.test_weight_sync import new_weights

TOKENS = 16
DELAY_S = 0.15  # per token on the mock: a generation takes ~2.4 s, pushes land in its middle


def base_weights(model_dir) -> list[tuple[str, torch.Tensor]]:
    return sorted(load_file(str(model_dir / "model.safetensors")).items())


def partial_engine(urls, model_dir) -> SGLangEngine:
    config = AutoConfig.from_pretrained(model_dir)
    pool = ServerPool(urls, timeout_s=60, retry=RetryPolicy(attempts=3, backoff_s=0.05))
    return SGLangEngine(pool, TensorSync(pool, 64, tp_size=1), max_in_flight=8, partial_rollouts=True,
                        routed_shape=(config.num_hidden_layers, config.num_experts_per_tok))


@pytest.fixture
def mock1(mock, tiny_hf_dir):
    """The first mock server; its original weights are back afterwards (later tests compare against them)."""
    yield mock[:1]
    set_token_delay(mock[0], 0.0)
    pool = ServerPool(mock[:1])
    TensorSync(pool, 64, tp_size=1).push(base_weights(tiny_hf_dir("qwen3_moe")), 0)


def generate_while_pushing(engine: SGLangEngine, url: str, prompts, params, pushes, after_s: float):
    """generate on a thread (as the rollout thread does); each (weights, version) is pushed from this thread
    `after_s` after the previous one, while the generation runs."""
    box: list = []
    thread = threading.Thread(target=lambda: box.append(engine.generate(prompts, params, return_routed_experts=True)))
    thread.start()
    deadline = time.monotonic() + 30
    while running_requests(url) < len(prompts) * params.n:  # one request per sample, all started
        assert time.monotonic() < deadline, "the generation never started"
        time.sleep(0.02)
    for weights, version in pushes:
        time.sleep(after_s)
        assert thread.is_alive(), "the generation ended before the push; raise TOKENS or DELAY_S"
        engine.update_weights(weights, version)
    thread.join(120)
    assert not thread.is_alive() and len(box) == 1
    return box[0]


def segments(c: Completion) -> list[tuple[int, int, int]]:
    """(start, end, version) of each run of one version in the response."""
    runs, start = [], 0
    for i in range(1, len(c.token_versions) + 1):
        if i == len(c.token_versions) or c.token_versions[i] != c.token_versions[start]:
            runs.append((start, i, c.token_versions[start]))
            start = i
    return runs


def test_a_push_mid_generation_keeps_tokens_and_resumes_under_the_new_weights(mock1, tiny_hf_dir):
    """Greedy, so every segment can be recomputed: segment k is the greedy continuation of prompt + the tokens
    before it under the weights of its version, with those weights' log-probs and routes; the rows of kept
    tokens are the ones of the forward that sampled them, not the resumed request's prefill of them."""
    model_dir = tiny_hf_dir("qwen3_moe")
    url = mock1[0]
    engine = partial_engine(mock1, model_dir)
    weights = {0: base_weights(model_dir), 1: new_weights(model_dir, 11), 2: new_weights(model_dir, 12)}
    engine.update_weights(weights[0], 0)
    set_token_delay(url, DELAY_S)
    prompts = [[1, 5, 9, 2], [3, 4]]
    params = SamplingParams(max_new_tokens=TOKENS, temperature=0.0, n=2)
    out = generate_while_pushing(engine, url, prompts, params, [(weights[1], 1), (weights[2], 2)], after_s=0.5)

    references = {v: EmbeddedEngine(model_dir) for v in weights}
    for v, ref in references.items():
        ref.update_weights(weights[v], v)
    assert [len(group) for group in out] == [2, 2]  # nothing lost, nothing duplicated
    prefill_differs = 0
    for prompt, group in zip(prompts, out):
        for c in group:
            assert c.prompt_ids == prompt and len(c.response_ids) == TOKENS and c.finish_reason == "length"
            runs = segments(c)
            versions = [v for _, _, v in runs]  # a push that lands before the segment's first token adds no run
            assert versions[0] == 0 and versions[-1] == 2 and versions == sorted(set(versions)), c.token_versions
            assert c.weight_version == 0
            assert c.routed_experts.shape[0] == len(prompt) + TOKENS - 1
            for start, end, version in runs:
                context = prompt + c.response_ids[:start]
                seg = SamplingParams(max_new_tokens=end - start, temperature=0.0)
                expected = references[version].generate([context], seg, return_routed_experts=True)[0][0]
                assert c.response_ids[start:end] == expected.response_ids
                assert c.response_logprobs[start:end] == pytest.approx(expected.response_logprobs, abs=1e-5)
                first_row = 0 if start == 0 else len(context) - 1
                rows = slice(first_row, len(prompt) - 1 + end)
                assert torch.equal(c.routed_experts[rows], expected.routed_experts[first_row:])
                if start:  # the resumed request's prefill of the kept tokens, under the newer weights
                    redone = expected.routed_experts[len(prompt) - 1:len(context) - 1]
                    prefill_differs += int(not torch.equal(redone, c.routed_experts[len(prompt) - 1:len(context) - 1]))
    assert prefill_differs > 0  # the rule is visible: splicing the resumed prefill's rows would change them
    log = [e for e in request_log(url) if e in ("/pause_generation", "/update_weights_from_tensor",
                                                "/continue_generation")]
    assert log == ["/pause_generation", "/update_weights_from_tensor", "/continue_generation"] * 3
    # 2 requests of n=2, then each of the 4 samples resumed on its own (once per push that found it running).
    assert request_log(url).count("/generate") >= 2 + 4


def test_an_aborted_sample_is_resumed_alone_and_finished_samples_are_kept(mock1, tiny_hf_dir):
    """Sampled with a seed and a stop token that ends sample 0 early: at the push sample 0 is done (one version,
    "stop"), sample 1 was aborted and is resumed alone; it goes on over two versions, its kept
    tokens and log-probs exactly those of the same seeded draw without a push."""
    model_dir = tiny_hf_dir("qwen3_moe")
    url = mock1[0]
    engine = partial_engine(mock1, model_dir)
    engine.update_weights(base_weights(model_dir), 0)
    prompt = [1, 5, 9, 2]
    params, dry = None, None
    for seed in range(20):  # a seed whose sample 0 stops at its second token and whose sample 1 never stops
        first = engine.generate([prompt], SamplingParams(max_new_tokens=TOKENS, temperature=1.0, n=2, seed=seed))[0]
        stop = first[0].response_ids[1]
        if stop in first[0].response_ids[:1]:
            continue
        params = SamplingParams(max_new_tokens=TOKENS, temperature=1.0, n=2, seed=seed, stop_token_ids=[stop])
        dry = engine.generate([prompt], params)[0]  # the same draws, with the stop token, and no push
        if stop not in dry[1].response_ids and len(dry[0].response_ids) == 2:
            break
    assert dry is not None and stop not in dry[1].response_ids, "no seed in 0..19 gives the case"
    set_token_delay(url, DELAY_S)
    before = request_log(url).count("/generate")
    [group] = generate_while_pushing(engine, url, [prompt], params, [(new_weights(model_dir, 13), 1)], after_s=0.6)
    done, resumed = group
    assert done.response_ids == dry[0].response_ids[:2] and done.finish_reason == "stop"
    assert done.token_versions == [0, 0] and done.response_logprobs == dry[0].response_logprobs[:2]
    n = len(resumed.response_ids)  # under the new weights it may draw the stop token (or eos) before TOKENS
    assert (n, resumed.finish_reason) == (TOKENS, "length") or resumed.finish_reason == "stop"
    k = resumed.token_versions.index(1)
    assert 2 <= k < n and resumed.token_versions == [0] * k + [1] * (n - k)
    assert resumed.response_ids[:k] == dry[1].response_ids[:k]  # the kept tokens are exactly the sampled ones
    assert resumed.response_logprobs[:k] == dry[1].response_logprobs[:k]
    assert request_log(url).count("/generate") - before == 3  # one request per sample, then sample 1's rest


def test_without_partial_rollouts_an_aborted_request_starts_over(mock1, tiny_hf_dir):
    """The default keeps its behaviour: no pause around a push, an aborted request is resubmitted whole."""
    model_dir = tiny_hf_dir("qwen3_moe")
    config = AutoConfig.from_pretrained(model_dir)
    pool = ServerPool(mock1, retry=RetryPolicy(attempts=3, backoff_s=0.05))
    engine = SGLangEngine(pool, TensorSync(pool, 64, tp_size=1), routed_shape=(config.num_hidden_layers,
                                                                               config.num_experts_per_tok))
    engine.update_weights(base_weights(model_dir), 0)
    assert "/pause_generation" not in request_log(mock1[0])
    set_token_delay(mock1[0], 0.1)
    box: list = []
    thread = threading.Thread(target=lambda: box.append(engine.generate([[1, 2, 3]], SamplingParams(
        max_new_tokens=TOKENS, temperature=0.0, n=2))))
    thread.start()
    while running_requests(mock1[0]) < 2:  # one request per sample
        time.sleep(0.02)
    engine.abort_all()  # the request runs >= TOKENS x 0.1 s, so this lands while it runs
    thread.join(60)
    assert all(c.token_versions is None and len(c.response_ids) == TOKENS for c in box[0][0])
    assert request_log(mock1[0]).count("/generate") == 4


def test_routed_experts_start_len_is_checked_like_sglang(mock1):
    body = {"input_ids": [1, 2, 3], "return_routed_experts": True, "routed_experts_start_len": 4,
            "sampling_params": {"max_new_tokens": 1}}
    r = httpx.post(mock1[0] + "/generate", json=body, timeout=30)
    assert r.status_code == 400 and "routed_experts_start_len" in r.json()["error"]["message"]
