"""The multi-turn tool loop against a scripted engine: exact tokens, loss masks, routes of inserted tokens,
turn and token limits, and tools that fail, hang or return garbage (each costs its sample, never the run)."""
from __future__ import annotations

import time

import pytest
import torch

from grpo_megatron.config import RolloutConfig, ToolsConfig
from grpo_megatron.models.tiny import TOOL_WORDS, build_tiny_tokenizer
from grpo_megatron.rollout.engines.base import Completion, RolloutEngine, SamplingParams
from grpo_megatron.rollout.functions import RolloutContext, generate_samples
from grpo_megatron.rollout.tools.formats import ToolFormat
from grpo_megatron.rollout.tools.registry import register_tool

FAULTY = ["test_raises", "test_hangs", "test_garbage", "test_huge"]
TOK = build_tiny_tokenizer(TOOL_WORDS + FAULTY)
LAYERS, TOPK = 2, 2


def ids(text: str) -> list[int]:
    return TOK(text, add_special_tokens=False).input_ids


class ScriptedEngine(RolloutEngine):
    """Answers turn t of every context with script(t); log-prob of the k-th token of a call is -(k + 1) / 100;
    route row j of call c is [[c, j], [c, j]] per layer, so the rows a sample keeps show which call made them;
    call c runs under weight version 10 + c (as if the trainer pushed weights between turns)."""

    def __init__(self, script):
        self.script, self.calls = script, []

    def generate(self, prompts, params, return_routed_experts=False):
        call = len(self.calls)
        self.calls.append({"prompts": [list(p) for p in prompts], "params": params})
        groups = []
        for prompt in prompts:
            outs = []
            for _ in range(params.n):
                tokens, finish = self.script(call, prompt)
                finish = "length" if len(tokens) > params.max_new_tokens else finish
                tokens = tokens[:params.max_new_tokens]
                rows = len(prompt) + len(tokens) - 1
                routes = torch.tensor([[[call, j]] * LAYERS for j in range(rows)], dtype=torch.int32)
                outs.append(Completion(list(prompt), tokens, [-(k + 1) / 100 for k in range(len(tokens))], finish,
                                       routes if return_routed_experts else None, weight_version=10 + call))
            groups.append(outs)
        return groups

    def update_weights(self, named_tensors, version):
        pass

    @property
    def weight_version(self):
        return 0

    def shutdown(self):
        pass


CALL = ids("<tool_call> calculator 1 2 + 3 4 </tool_call>")
ANSWER = ids("answer 4 6") + [TOK.eos_token_id]


def first_calls_then_answers(call, prompt):
    return (CALL, "stop") if call == 0 else (ANSWER, "stop")


def run(script, n=2, max_new_tokens=40, routes=False, **tools):
    engine = ScriptedEngine(script)
    cfg = RolloutConfig(function="tool_loop", group_size=n, max_new_tokens=max_new_tokens,
                        tools=ToolsConfig(format="words", **{"names": ["calculator"], **tools}))
    items = [{"prompt_ids": [TOK.bos_token_id] + ids("add 1 2 3 4 ="), "answer": "46", "meta": {"task": "add"}}]
    params = SamplingParams(max_new_tokens=max_new_tokens, n=n, seed=7)
    samples = generate_samples(engine, items, params, RolloutContext(TOK, cfg, routes), first_group=3)
    return samples, engine


def test_sampled_tokens_and_inserted_tool_tokens_are_exact_and_masked():
    samples, engine = run(first_calls_then_answers)
    tool = ToolFormat("words", TOK).render("46", 64)
    assert tool == ids("<tool_response> 4 6 </tool_response>")
    for s in samples:
        assert s.group == 3
        assert s.response_ids == CALL + tool + ANSWER  # exactly the sampled tokens and the inserted ones
        assert s.loss_mask == [1] * len(CALL) + [0] * len(tool) + [1] * len(ANSWER)
        assert s.weight_versions == [10] * (len(CALL) + len(tool)) + [11] * len(ANSWER)  # tool tokens: the call's
        assert s.engine_logprobs == ([-(k + 1) / 100 for k in range(len(CALL))] + [0.0] * len(tool)
                                     + [-(k + 1) / 100 for k in range(len(ANSWER))])
        assert not s.truncated and s.meta == {"task": "add", "turns": 2, "tool_calls": 1, "tool_errors": 0,
                                              "finish": "stop"}
    # turn 0: the prompt once with n samples (shared prefill); turn 1: each sample's exact context, n=1
    first, second = engine.calls
    assert first["params"].n == 2 and first["prompts"] == [samples[0].prompt_ids]
    assert TOK.convert_tokens_to_ids("</tool_call>") in first["params"].stop_token_ids
    assert second["params"].n == 1 and second["params"].seed != first["params"].seed
    assert second["prompts"] == [s.prompt_ids + CALL + tool for s in samples]


def test_routes_of_tool_tokens_come_from_the_next_turns_prefill():
    samples, _ = run(first_calls_then_answers, routes=True)
    s = samples[0]
    assert s.routed_experts.shape == (s.length - 1, LAYERS, TOPK)
    made_by = s.routed_experts[:, 0, 0].tolist()  # the engine call that produced each row
    first_turn_rows = len(s.prompt_ids) + len(CALL) - 1  # prompt prefill + decode of the call's tokens
    assert made_by == [0] * first_turn_rows + [1] * (s.length - 1 - first_turn_rows)
    assert s.routed_experts[:, 0, 1].tolist() == list(range(s.length - 1))  # row j is position j's


def test_a_turn_without_a_call_ends_the_sample_like_single_turn():
    samples, engine = run(lambda call, prompt: (ANSWER, "stop"))
    assert len(engine.calls) == 1
    assert all(s.response_ids == ANSWER and s.loss_mask == [1] * len(ANSWER) and s.meta["tool_calls"] == 0
               for s in samples)


def test_max_turns_stops_calling_tools():
    samples, engine = run(lambda call, prompt: (CALL, "stop"), max_turns=3, max_new_tokens=200)
    for s in samples:
        assert s.meta["turns"] == 3 and s.meta["tool_calls"] == 2 and s.meta["finish"] == "max_turns" and s.truncated
        assert s.response_ids[-len(CALL):] == CALL and s.loss_mask[-1] == 1  # the last call was not run
    assert len(engine.calls) == 3


@pytest.mark.parametrize("max_new_tokens", [9, 13, 16, 25])
def test_token_budget_covers_tool_tokens_and_never_ends_on_them(max_new_tokens):
    samples, _ = run(lambda call, prompt: (CALL, "stop"), max_new_tokens=max_new_tokens, max_turns=10)
    for s in samples:
        assert len(s.response_ids) <= max_new_tokens
        assert s.loss_mask[-1] == 1  # a sample never ends on inserted tokens (their routes need a prefill)
        assert s.truncated and s.meta["finish"] == "length"


def test_max_tokens_per_turn_cuts_a_turn():
    samples, engine = run(lambda call, prompt: (ANSWER * 5, "stop"), max_tokens_per_turn=4)
    assert engine.calls[0]["params"].max_new_tokens == 4
    assert all(len(s.response_ids) == 4 and s.meta["finish"] == "length" for s in samples)


@register_tool("test_raises")
def _raises(expression: str) -> str:
    raise RuntimeError("tool crashed")


@register_tool("test_hangs")
def _hangs(expression: str) -> str:
    time.sleep(30)
    return "never"


@register_tool("test_garbage")
def _garbage(expression: str) -> str:
    return {"not": "a string"}


@register_tool("test_huge")
def _huge(expression: str) -> str:
    return "9" * 100_000


def calls(name: str):
    body = ids(f"<tool_call> {name} 1 + 1 </tool_call>") if name else ids("<tool_call> </tool_call>")
    return lambda call, prompt: (body, "stop") if call == 0 else (ANSWER, "stop")


@pytest.mark.parametrize("name, error", [
    ("test_raises", "RuntimeError: tool crashed"), ("test_hangs", "timed out after 0.3 s"),
    ("test_garbage", "returned dict, not str"), ("calculator", None), ("python", "unknown tool"),
    ("", "empty tool call")])
def test_a_failing_tool_costs_its_sample_not_the_run(name, error, caplog):
    start = time.monotonic()
    with caplog.at_level("WARNING"):
        samples, _ = run(calls(name), names=["calculator", *FAULTY], timeout_s=0.3, max_output_tokens=8)
    assert time.monotonic() - start < 5  # a hung tool costs its timeout, once per round (calls run concurrently)
    for s in samples:
        assert s.meta["tool_calls"] == 1 and s.meta["tool_errors"] == (error is not None)
        assert s.response_ids[-len(ANSWER):] == ANSWER and not s.truncated  # the sample went on
        inserted = TOK.decode([t for t, m in zip(s.response_ids, s.loss_mask) if m == 0])
        if error is None:
            assert inserted == "<tool_response> 2 </tool_response>"
        else:
            assert "e r r o r" in inserted and "warning" not in inserted
    if error is not None:
        assert error in caplog.text


def test_tool_output_is_cut_to_max_output_tokens():
    samples, _ = run(calls("test_huge"), names=["test_huge"], max_output_tokens=5, max_new_tokens=100)
    tool = [t for t, m in zip(samples[0].response_ids, samples[0].loss_mask) if m == 0]
    assert tool == ids("<tool_response> 9 9 9 9 9 </tool_response>")


def test_python_calls_run_in_the_sandbox_from_threads():
    code = ids("<tool_call> python p r i n t ( 6 * 7 ) </tool_call>")
    samples, _ = run(lambda call, prompt: (code, "stop") if call == 0 else (ANSWER, "stop"), n=6,
                     names=["python"], timeout_s=30.0)
    for s in samples:
        inserted = [t for t, m in zip(s.response_ids, s.loss_mask) if m == 0]
        assert inserted == ids("<tool_response> 4 2 </tool_response>") and s.meta["tool_errors"] == 0
