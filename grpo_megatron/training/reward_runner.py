"""Scores responses with the configured reward functions without letting one bad call kill the run.

Each configured function is a registered reward (grpo_megatron.rollout.rewards) or a user function
given by import path "package.module:function"; all are called as fn(response_text, answer, meta)
where meta carries the dataset record's extra fields and "prompt". A call that raises or runs past
`timeout_s` scores `fallback` for that sample and is logged with the sample.
"""
from __future__ import annotations

import concurrent.futures
import importlib
import logging
from collections.abc import Callable

from grpo_megatron.rollout.rewards import get_reward_fn

logger = logging.getLogger(__name__)


def resolve_reward(name: str, options: dict) -> Callable:
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"reward function {name!r} cannot be imported ({exc}); "
                             "give 'package.module:function' importable from the run's environment") from exc
        if options:
            import functools

            fn = functools.partial(fn, **options)
        return fn
    return get_reward_fn(name, **options)


class RewardRunner:
    def __init__(self, reward_cfg):
        self.cfg = reward_cfg
        self.functions = [(spec.name, spec.weight, resolve_reward(spec.name, spec.options))
                          for spec in reward_cfg.functions]
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="reward")
        self.failures = 0

    def _result(self, name: str, future: concurrent.futures.Future, text: str, answer) -> float:
        try:
            return float(future.result(timeout=self.cfg.timeout_s))
        except concurrent.futures.TimeoutError:
            self.failures += 1
            logger.warning("reward %s timed out after %.1fs on response %r (answer %r); scoring %s",
                           name, self.cfg.timeout_s, text[:200], answer, self.cfg.fallback)
            return self.cfg.fallback
        except Exception as exc:  # a user's reward function may raise anything
            self.failures += 1
            logger.warning("reward %s raised %s: %s on response %r (answer %r); scoring %s",
                           name, type(exc).__name__, exc, text[:200], answer, self.cfg.fallback)
            return self.cfg.fallback

    def score(self, prompts: list[str], texts: list[str], answers: list, metas: list[dict]) -> list[float]:
        """Weighted sum of the reward functions per sample. Every call is submitted before any is awaited,
        so slow rewards (math verification, sandboxes) run `max_workers` at a time instead of one by one."""
        calls = []
        for prompt, text, answer, meta in zip(prompts, texts, answers, metas):
            meta = {**meta, "prompt": prompt}
            calls.append([(name, weight, self._pool.submit(fn, text, answer, meta)) for name, weight, fn in self.functions])
        return [sum(weight * self._result(name, future, text, answer) for name, weight, future in sample_calls)
                for sample_calls, text, answer in zip(calls, texts, answers)]
