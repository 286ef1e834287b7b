"""Rollout functions: how a round of prompt items becomes trainable samples.

A rollout function is `fn(engine, items, params, context) -> list[list[Sample]]`: the rollout engine, the
round's prompt items (`{"prompt_ids", "answer", "meta", ...}` from PromptDataset), the SamplingParams (with
`n` = the group size) and a RolloutContext; it returns `params.n` Samples per item, in item order. It takes a
round of items rather than one so that it can batch every item's generation into one engine call (one
prefill per prompt, all of SGLang's concurrency). Each Sample carries:

- `prompt_ids`, `response_ids`: the exact token ids, never a re-tokenisation of rendered text;
- `loss_mask`: per response token, 1 where the policy sampled it (trained), 0 where it was inserted (tool
  output: no gradient, not in the loss normaliser, not in KL); None means all 1;
- `engine_logprobs`: per response token, the behaviour log-prob (any value, e.g. 0.0, where loss_mask is 0);
- `routed_experts` when `context.return_routed_experts` (R3): [len(prompt) + len(response) - 1, layers, topk];
- `weight_versions` (optional): per response token, the weight version that sampled it (None: the engine's
  version when the round started, for every token), for the asynchronous modes' staleness;
- `truncated`, `answer` and `meta`: what the reward and the DAPO filters need (`group` is set by the caller).

`rollout.function` picks one: "" (this module's `single_turn`, one engine call per round), "tool_loop"
(grpo_megatron.rollout.tools.loop: multi-turn tool calls), or a user's "package.module:function".
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from grpo_megatron.registry import Registry, UnknownNameError
from grpo_megatron.rollout.engines.base import Completion, RolloutEngine, SamplingParams
from grpo_megatron.samples import Sample

RolloutFunction = Callable[[RolloutEngine, list[dict], SamplingParams, "RolloutContext"], list[list[Sample]]]


@dataclass
class RolloutContext:
    """What a rollout function may need besides the engine: tokenizer, the run's `rollout` config section
    (`rollout.tools`, `rollout.function_options`) and whether routes are wanted (R3)."""

    tokenizer: Any
    config: Any  # grpo_megatron.config.RolloutConfig
    return_routed_experts: bool = False
    options: dict = field(default_factory=dict)


def sample_from_completion(item: dict, out: Completion) -> Sample:
    """One engine completion of `item` as a Sample (every response token sampled, so loss_mask None)."""
    return Sample(prompt_ids=list(out.prompt_ids), response_ids=list(out.response_ids), group=0,
                  truncated=out.finish_reason == "length", engine_logprobs=list(out.response_logprobs),
                  routed_experts=out.routed_experts, answer=item["answer"], meta=dict(item["meta"]),
                  weight_versions=out.versions)


def single_turn(engine: RolloutEngine, items: list[dict], params: SamplingParams,
                context: RolloutContext) -> list[list[Sample]]:
    """Today's generation: one engine call for all items, params.n completions each."""
    completions = engine.generate([item["prompt_ids"] for item in items], params,
                                  return_routed_experts=context.return_routed_experts)
    return [[sample_from_completion(item, out) for out in outs] for item, outs in zip(items, completions)]


def _tool_loop(engine, items, params, context):
    from grpo_megatron.rollout.tools.loop import tool_loop

    return tool_loop(engine, items, params, context)


ROLLOUT_FUNCTIONS: Registry = Registry("rollout function", hint=" ('' is single_turn), or 'package.module:function'")
ROLLOUT_FUNCTIONS.add("", single_turn)
ROLLOUT_FUNCTIONS.add("single_turn", single_turn)
ROLLOUT_FUNCTIONS.add("tool_loop", _tool_loop)


def resolve_rollout_function(name: str) -> RolloutFunction:
    """A built-in name or "package.module:function"; ValueError naming the fix otherwise."""
    try:
        fn = ROLLOUT_FUNCTIONS.get(name)
    except UnknownNameError as err:
        raise UnknownNameError(f"rollout.function={name!r}: {err}") from None
    if not callable(fn):
        raise ValueError(f"rollout.function={name!r} is not callable; point it at a function")
    return fn


def generate_samples(engine: RolloutEngine, items: list[dict], params: SamplingParams, context: RolloutContext,
                     first_group: int) -> list[Sample]:
    """The trainer's entry point: run the configured function, check its samples, number their groups."""
    fn = resolve_rollout_function(context.config.function)
    groups = fn(engine, items, params, context)
    if len(groups) != len(items):
        raise ValueError(f"rollout function {context.config.function!r} returned {len(groups)} groups for "
                         f"{len(items)} prompts; return one list of params.n samples per prompt item")
    samples = []
    for group, outs in enumerate(groups, start=first_group):
        if len(outs) != params.n:
            raise ValueError(f"rollout function {context.config.function!r} returned {len(outs)} samples for a "
                             f"prompt; GRPO groups need exactly params.n={params.n}")
        for sample in outs:
            check_sample(sample, context.return_routed_experts)
            samples.append(replace(sample, group=group))
    return samples


def check_sample(sample: Sample, routes_wanted: bool) -> None:
    """Per-token lists must line up with the response, and routes cover every position; else ValueError."""
    n = len(sample.response_ids)
    if not n:
        raise ValueError("a rollout sample has no response tokens; return at least one sampled token")
    if sample.engine_logprobs is not None and len(sample.engine_logprobs) != n:
        raise ValueError(f"a rollout sample has {len(sample.engine_logprobs)} engine log-probs for {n} response "
                         "tokens; give one per response token (0.0 where loss_mask is 0)")
    if sample.loss_mask is not None and (len(sample.loss_mask) != n or set(sample.loss_mask) - {0, 1}):
        raise ValueError(f"a rollout sample's loss_mask must hold one 0/1 per response token ({n}), got "
                         f"{len(sample.loss_mask)} values")
    if routes_wanted:
        rows = sample.length - 1
        if sample.routed_experts is None or sample.routed_experts.shape[0] != rows:
            got = None if sample.routed_experts is None else tuple(sample.routed_experts.shape)
            raise ValueError(f"routing replay r3 needs routed_experts of {rows} rows (len(prompt) + len(response) "
                             f"- 1) per sample, got {got}; record the routes of inserted tokens from a prefill")
