"""The built-in multi-turn tool loop (`rollout.function: tool_loop`), token-in/token-out throughout.

Per round of prompts: the first turn samples all n responses of every prompt in one engine call (shared
prefill); generation stops at eos, a stop token, or the tool-call end marker (formats.py). A turn that ends in
a call has the call parsed and run (registry.ToolRunner: errors, hangs and garbage become "error: ..." output);
the output is inserted as tokens, and every sample still going continues in one further engine call per turn,
its context being exactly prompt + the tokens so far. A sample's response is therefore the concatenation of
the tokens the engine sampled (loss mask 1, the engine's log-probs) and the inserted tool tokens (loss mask 0,
log-prob 0.0): nothing is ever decoded and re-tokenised.

Limits: `rollout.max_new_tokens` is the budget of the whole response, tool tokens included (turns sampled past
it are cut, and a tool output that would leave no room for one more sampled token ends the sample instead of
being inserted); `rollout.tools.max_turns` model turns per sample (a call made in the last turn is not run).
Either ends the sample as truncated (`meta["finish"]` "length" or "max_turns"), which DAPO's overlong filter
and penalty see like any cut response.

Routing replay (R3): every position keeps the experts of the forward that first processed it. Rows of
sampled tokens come from the engine's decode when they were sampled; rows of inserted tool tokens (and of
the call's end marker, which no decode step processed) come from the prefill of the next turn, which the
engine returns as part of that turn's routes. The loop never ends a sample on inserted tokens, so every
position of prompt + response has its row and R3 replays tool positions like any other; they carry no loss,
but they shape the hidden states the later sampled tokens attend to. In the asynchronous modes each sampled
token keeps the weight version that sampled it (turns may run under different versions); tool tokens take
the version of the call before them.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import torch

from grpo_megatron.rollout.engines.base import Completion, RolloutEngine, SamplingParams
from grpo_megatron.rollout.tools.formats import ToolCall, ToolFormat
from grpo_megatron.rollout.tools.registry import ToolRunner, resolve_tools
from grpo_megatron.samples import Sample

logger = logging.getLogger(__name__)

_TURN_SEED_STRIDE = 1_000_033  # turn t > 0 samples with seed + t * stride: reproducible, apart from turn 0's


@dataclass
class _Trajectory:
    item: dict
    prompt_ids: list[int]
    response: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)  # weight version per response token
    routes: torch.Tensor | None = None
    turns: int = 0
    tool_calls: int = 0
    tool_errors: list[str] = field(default_factory=list)
    finish: str = "stop"

    @property
    def context(self) -> list[int]:
        return self.prompt_ids + self.response

    def add_turn(self, out: Completion, budget: int) -> list[int]:
        """Append the sampled tokens (cut to the budget left); their rows of routes; the kept tokens."""
        keep = min(len(out.response_ids), budget - len(self.response))
        tokens = list(out.response_ids[:keep])
        if out.routed_experts is not None:
            rows = len(self.context) + keep - 1  # rows known after this turn: every position but the last
            start = 0 if self.routes is None else len(self.routes)
            new = out.routed_experts[start:rows]
            self.routes = new.clone() if self.routes is None else torch.cat([self.routes, new])
        self.response += tokens
        self.logprobs += list(out.response_logprobs[:keep])
        self.mask += [1] * keep
        self.versions += out.versions[:keep]
        self.turns += 1
        if keep < len(out.response_ids) or out.finish_reason == "length":
            self.finish = "length"
        return tokens

    def insert(self, tokens: list[int]) -> None:
        """Tool tokens: not trained; their version is the call's (the weights that asked for them)."""
        self.response += tokens
        self.logprobs += [0.0] * len(tokens)
        self.mask += [0] * len(tokens)
        self.versions += [self.versions[-1]] * len(tokens)

    def sample(self) -> Sample:
        meta = {**self.item["meta"], "turns": self.turns, "tool_calls": self.tool_calls,
                "tool_errors": len(self.tool_errors), "finish": self.finish}
        return Sample(prompt_ids=list(self.prompt_ids), response_ids=self.response, group=0,
                      truncated=self.finish != "stop", engine_logprobs=self.logprobs, routed_experts=self.routes,
                      loss_mask=self.mask, answer=self.item["answer"], meta=meta, weight_versions=self.versions)


def tool_loop(engine: RolloutEngine, items: list[dict], params: SamplingParams, context) -> list[list[Sample]]:
    """params.n multi-turn samples per item (see the module docstring); `context` is a RolloutContext."""
    cfg = context.config.tools
    fmt = ToolFormat(cfg.format, context.tokenizer, *cfg.call_markers, cfg.response_template)
    runner = ToolRunner(resolve_tools(cfg.names, cfg.timeout_s, cfg.memory_mb), cfg.timeout_s)
    budget = params.max_new_tokens
    per_turn = min(budget, cfg.max_tokens_per_turn or budget)
    stops = [*params.stop_token_ids, fmt.end_id]
    groups = [[_Trajectory(item, list(item["prompt_ids"])) for _ in range(params.n)] for item in items]
    active = [t for group in groups for t in group]
    turn_params = dataclasses.replace(params, stop_token_ids=stops, max_new_tokens=per_turn)
    outs = engine.generate([item["prompt_ids"] for item in items], turn_params, context.return_routed_experts)
    completions = [out for group in outs for out in group]
    turn = 0
    while active:
        pending: list[tuple[_Trajectory, ToolCall]] = []
        for traj, out in zip(active, completions):
            call = fmt.parse(traj.add_turn(out, budget))
            if call is None or traj.finish == "length":
                continue
            if traj.turns >= cfg.max_turns:
                traj.finish = "max_turns"
            else:
                pending.append((traj, call))
        active, errors = [], []
        for (traj, call), result in zip(pending, runner.run([call for _, call in pending])):
            traj.tool_calls += 1
            if result.error is not None:
                traj.tool_errors.append(result.error)
                errors.append(result.error)
            tokens = fmt.render(result.output, cfg.max_output_tokens)
            if len(traj.response) + len(tokens) >= budget:
                traj.finish = "length"  # no room left to sample after the output: end here, nothing inserted
                continue
            traj.insert(tokens)
            active.append(traj)
        if errors:
            logger.warning("%d of %d tool calls failed (those samples go on with the error as the output); the "
                           "first: %s", len(errors), len(pending), errors[0])
        if not active:
            break
        turn += 1
        seed = None if params.seed is None else params.seed + turn * _TURN_SEED_STRIDE
        left = max(budget - len(t.response) for t in active)
        turn_params = dataclasses.replace(params, n=1, seed=seed, stop_token_ids=stops,
                                          max_new_tokens=min(per_turn, left))
        outs = engine.generate([t.context for t in active], turn_params, context.return_routed_experts)
        completions = [group[0] for group in outs]
    return [[t.sample() for t in group] for group in groups]

