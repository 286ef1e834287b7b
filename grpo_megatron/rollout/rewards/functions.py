"""Rule-based rewards: a registry of reward functions and their weighted combination.

A reward function is `fn(response_text, answer, meta, **options) -> float`; options (e.g. the regex of
`format`) come from the config and are bound by get_reward_fn, leaving `fn(response_text, answer, meta)`.
As in TRL's list of reward functions, several can be combined with weights (e.g. accuracy + format).
"""
from __future__ import annotations

import functools
import inspect
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from grpo_megatron.registry import Registry

RewardFn = Callable[[str, "str | None", dict], float]

REWARDS: Registry = Registry("reward", hint=" (add one with @register_reward)")


def register_reward(name: str) -> Callable[[Callable[..., float]], Callable[..., float]]:
    """Decorator adding a reward function to the registry under `name`."""
    return REWARDS.register(name)


def known_rewards() -> list[str]:
    return list(REWARDS.names())


def get_reward_fn(name: str, **options: Any) -> RewardFn:
    """The reward `name` (registered, or "package.module:function") with its config options bound, as
    fn(response_text, answer, meta)."""
    fn = REWARDS.get(name)
    try:
        inspect.signature(fn).bind("", None, {}, **options)
    except TypeError as err:
        raise ValueError(f"reward {name!r}: bad options {sorted(options)} ({err}); "
                         f"its signature is {name}{inspect.signature(fn)}") from None
    return functools.partial(fn, **options) if options else fn


def resolve_reward(name: str, options: dict) -> RewardFn:
    """A `reward.functions` entry: `remote` (an HTTP reward server, called once per step with every sample,
    batched; grpo_megatron/rollout/rewards/remote.py), a registered reward, or "package.module:function"."""
    if name == "remote":
        from grpo_megatron.rollout.rewards.remote import RemoteReward

        return RemoteReward(**options)
    return get_reward_fn(name, **options)


def _require_answer(name: str, answer: str | None) -> str:
    if answer is None:
        raise ValueError(f"reward {name!r} needs a reference answer; give the dataset an `answer` "
                         f"or `ground_truth` field")
    return answer


@register_reward("exact_match")
def exact_match(response_text: str, answer: str | None, meta: dict) -> float:
    """1 when the stripped response equals the stripped answer."""
    return float(response_text.strip() == _require_answer("exact_match", answer).strip())


_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def extract_final_answer(text: str) -> str | None:
    """The final answer of a solution: after the last '####', else the last \\boxed{...}, else the last number."""
    if "####" in text:
        return text.rsplit("####", 1)[1].strip()
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, braces balanced (so \\boxed{\\frac{1}{2}} works)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin - 1, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i]
    return None


def _as_number(text: str) -> float | None:
    cleaned = text.strip().rstrip(".").replace(",", "").replace("$", "")
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


@register_reward("math_answer")
def math_answer(response_text: str, answer: str | None, meta: dict) -> float:
    """1 when the response's final answer equals the reference's (numerically when both are numbers).

    A reference holding '####' or \\boxed{} goes through the same extraction (so a GSM8K-style solution
    ending in '#### 72' works); any other reference is the answer itself, e.g. "\\frac{1}{2}".
    """
    predicted = extract_final_answer(response_text)
    if predicted is None:
        return 0.0
    reference = _require_answer("math_answer", answer)
    if "####" in reference or "\\boxed{" in reference:
        reference = extract_final_answer(reference) or ""
    predicted_number, reference_number = _as_number(predicted), _as_number(reference)
    if predicted_number is not None and reference_number is not None:
        return float(math.isclose(predicted_number, reference_number, rel_tol=1e-9, abs_tol=1e-9))
    return float(predicted.strip() == reference.strip())


@register_reward("format")
def format_reward(response_text: str, answer: str | None, meta: dict, *, pattern: str) -> float:
    """1 when the whole response (stripped) matches the regex `pattern` (DOTALL), e.g. '<think>.*</think>.*'."""
    return float(re.fullmatch(pattern, response_text.strip(), flags=re.DOTALL) is not None)


@register_reward("math_verify")
def math_verify_reward(response_text: str, answer: str | None, meta: dict) -> float:
    """1 when HF's math-verify judges the response's answer equal to the reference (LaTeX, fractions,
    sets, intervals...), a more forgiving check than `math_answer`'s numbers-or-strings comparison."""
    try:
        from math_verify import parse, verify
    except ImportError as exc:
        raise ImportError("reward 'math_verify' needs the math-verify package: pip install math-verify") from exc
    reference = _require_answer("math_verify", answer)
    gold = parse(reference if "$" in reference or "\\" in reference else f"${reference}$")
    return float(bool(gold) and verify(gold, parse(response_text)))


@register_reward("length")
def length_reward(response_text: str, answer: str | None, meta: dict, *, max_words: int,
                  penalty_per_word: float = 0.01) -> float:
    """0 up to `max_words` whitespace-separated words, then -penalty_per_word for each word over, down
    to -1: a soft brake on verbosity to combine with a correctness reward."""
    excess = max(0, len(response_text.split()) - max_words)
    return -min(1.0, excess * penalty_per_word)


@dataclass
class RewardSpec:
    """One term of the total reward: a registered reward, its weight and its config options."""

    name: str
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Rewards:
    """Weighted totals per completion, and each reward's unweighted values (for logging)."""

    total: list[float]
    by_name: dict[str, list[float]]


def compute_rewards(
    completions_texts: Sequence[str],
    answers: Sequence[str | None],
    metas: Sequence[dict],
    fn_names_and_weights: Sequence[RewardSpec | tuple[str, float] | tuple[str, float, dict]],
) -> Rewards:
    """Score every completion with every reward and sum them with their weights."""
    if not len(completions_texts) == len(answers) == len(metas):
        raise ValueError(f"compute_rewards: {len(completions_texts)} completions, {len(answers)} answers and "
                         f"{len(metas)} metas; pass one answer and one meta per completion")
    specs = [s if isinstance(s, RewardSpec) else RewardSpec(*s) for s in fn_names_and_weights]
    if not specs:
        raise ValueError("compute_rewards: no reward functions given; list at least one (name, weight)")
    if len({s.name for s in specs}) != len(specs):
        raise ValueError(f"compute_rewards: a reward is listed twice in {[s.name for s in specs]}; merge the weights")
    total = [0.0] * len(completions_texts)
    by_name = {}
    for spec in specs:
        fn = get_reward_fn(spec.name, **spec.options)
        values = [float(fn(text, answer, meta)) for text, answer, meta in zip(completions_texts, answers, metas)]
        by_name[spec.name] = values
        total = [t + spec.weight * v for t, v in zip(total, values)]
    return Rewards(total=total, by_name=by_name)
