"""The tool loop on real engines (embedded, and SGLang's /generate with input_ids against the mock server):
every turn's context is exactly the tokens so far, the trained tokens are the sampled ones (their engine
log-probs match a teacher-forced forward of the final sequence), and under R3 every position has its route,
tool tokens' taken from a prefill.

A random tiny model makes no real tool calls, so the format's end marker is the token the model emits first
(greedy): the first turn stops on it at once, the call has no start marker and so returns an error as tool
output, which is inserted, and the loop goes on; the same trajectory as a real call, tokens-wise."""
from __future__ import annotations

import pytest
import torch
import transformers

from grpo_megatron.config import RolloutConfig, ToolsConfig
from grpo_megatron.rollout.engines.base import RolloutEngine, SamplingParams
from grpo_megatron.rollout.engines.embedded import EmbeddedEngine
from grpo_megatron.rollout.functions import RolloutContext, generate_samples

MAX_NEW_TOKENS = 24


class Recording(RolloutEngine):
    """Passes generate() through, keeping every call's prompts and completions."""

    def __init__(self, engine: RolloutEngine):
        self.engine, self.calls = engine, []

    def generate(self, prompts, params, return_routed_experts=False):
        out = self.engine.generate(prompts, params, return_routed_experts)
        self.calls.append((prompts, params, out))
        return out

    def update_weights(self, named_tensors, version):
        self.engine.update_weights(named_tensors, version)

    @property
    def weight_version(self):
        return self.engine.weight_version

    def shutdown(self):
        self.engine.shutdown()


def tool_loop_samples(engine: RolloutEngine, model_dir, routes: bool):
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    prompts = [tokenizer(text).input_ids for text in ("copy a b c =", "first 1 2 3 =")]
    greedy = SamplingParams(max_new_tokens=1, temperature=0.0, n=1)
    first = [group[0].response_ids[0] for group in engine.generate(prompts, greedy)]
    end = tokenizer.convert_ids_to_tokens(first[0])
    cfg = RolloutConfig(function="tool_loop", max_new_tokens=MAX_NEW_TOKENS, tools=ToolsConfig(
        format="words", names=["calculator"], max_turns=3, max_output_tokens=4, call_markers=["#", end]))
    items = [{"prompt_ids": p, "answer": "1", "meta": {}} for p in prompts]
    params = SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0, n=2, seed=3)
    recording = Recording(engine)
    samples = generate_samples(recording, items, params, RolloutContext(tokenizer, cfg, routes), first_group=0)
    return samples, recording, first


def check_exact_tokens(samples, recording, first, model_dir, atol: float = 1e-4):
    """Turn contexts are prefixes of the final samples, token for token; sampled tokens' engine log-probs match
    a float32 teacher-forced forward within `atol` (an engine computing in bf16 needs more); tool tokens 0."""
    assert samples[0].response_ids[0] == first[0] and 0 in samples[0].loss_mask  # a tool output was inserted
    assert samples[0].meta["tool_calls"] >= 1 and samples[0].meta["tool_errors"] >= 1
    sent = [prompt for prompts, _, _ in recording.calls[1:] for prompt in prompts]  # contexts of turns > 0
    for context in sent:  # each is a prompt + a prefix of its sample's final response, token for token
        assert any(context == s.prompt_ids + s.response_ids[:len(context) - len(s.prompt_ids)] for s in samples)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for s in samples:
        with torch.no_grad():
            logits = model(torch.tensor([s.prompt_ids + s.response_ids])).logits[0].float()
        span = torch.arange(len(s.prompt_ids) - 1, s.length - 1)
        forced = torch.log_softmax(logits[span], -1).gather(1, torch.tensor(s.response_ids)[:, None])[:, 0]
        sampled = torch.tensor(s.loss_mask, dtype=torch.bool)
        assert torch.allclose(forced[sampled], torch.tensor(s.engine_logprobs)[sampled], atol=atol)
        assert all(lp == 0.0 for lp, m in zip(s.engine_logprobs, s.loss_mask) if m == 0)


def check_routes(samples, engine, tool_agreement: float = 1.0):
    """Rows of tool tokens equal a prefill of the whole sequence (they were recorded from one); in bf16 a prefill
    of a longer context can flip a near-tie, so `tool_agreement` may be set below 1 there."""
    for s in samples:
        assert s.routed_experts.shape[0] == s.length - 1
        prefill = engine.generate([s.prompt_ids + s.response_ids], SamplingParams(max_new_tokens=1, temperature=0.0),
                                  return_routed_experts=True)[0][0].routed_experts[:s.length - 1]
        tool_rows = [len(s.prompt_ids) - 1 + j for j, m in enumerate(s.loss_mask) if m == 0]
        if tool_agreement == 1.0:
            assert torch.equal(s.routed_experts[tool_rows], prefill[tool_rows])
        else:
            same = (s.routed_experts[tool_rows].sort(-1).values == prefill[tool_rows].sort(-1).values).all(-1)
            assert int(same.sum()) >= tool_agreement * len(tool_rows)
        agree = (s.routed_experts.sort(-1).values == prefill.sort(-1).values).all(-1).float().mean()
        assert agree > 0.9  # sampled rows come from decode steps; the same experts up to float ties


def test_embedded_engine_tool_loop_is_token_exact_with_routes(tiny_checkpoint):
    model_dir = tiny_checkpoint("qwen3_moe")
    engine = EmbeddedEngine(model_dir, seed=0)
    samples, recording, first = tool_loop_samples(engine, model_dir, routes=True)
    check_exact_tokens(samples, recording, first, model_dir)
    check_routes(samples, engine)


@pytest.fixture(scope="module")
def mock_url(tiny_checkpoint):
    from tests.sglang.conftest import mock_servers

    with mock_servers(tiny_checkpoint("qwen3_moe"), 1) as (urls, _):
        yield urls[0]


def test_sglang_tool_loop_sends_input_ids_and_is_token_exact(mock_url, tiny_checkpoint):
    from tests.sglang.test_client import make_engine

    model_dir = tiny_checkpoint("qwen3_moe")
    engine = make_engine([mock_url], lambda family: model_dir)
    samples, recording, first = tool_loop_samples(engine, model_dir, routes=True)
    check_exact_tokens(samples, recording, first, model_dir)
    check_routes(samples, engine)
