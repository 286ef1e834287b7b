"""Scores responses with the configured reward functions without letting one bad call kill the run.

Each configured function is a registered reward (grpo_megatron.rollout.rewards.functions) or a user function
given by import path "package.module:function"; all are called as fn(response_text, answer, meta)
where meta carries the dataset record's extra fields and "prompt". A call that raises or runs past
`timeout_s` scores `fallback` for that sample; failures are counted and logged once per batch with one
example, and `reward.max_failed_steps` steps in a row in which every call failed stop the run.
The name `remote` is an HTTP reward server (grpo_megatron/rollout/rewards/remote.py, its options the
client's): it is called once per step with every sample and batches, retries and times out by itself.
"""
from __future__ import annotations

import concurrent.futures
import logging

from grpo_megatron.errors import UserError
from grpo_megatron.rollout.rewards.functions import resolve_reward

logger = logging.getLogger(__name__)


class RewardsFailedError(UserError, RuntimeError):
    """Every reward call failed for several steps in a row: the reward function itself is broken."""


class RewardRunner:
    def __init__(self, reward_cfg):
        self.cfg = reward_cfg
        self.functions = [(spec.name, spec.weight, resolve_reward(spec.name, spec.options))
                          for spec in reward_cfg.functions]
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="reward")
        self.failures = 0  # failed calls since the start
        self.last_failed = self.last_calls = 0  # of the latest `score`
        self._failed_steps = 0  # steps in a row in which every call failed

    def _result(self, name: str, future: concurrent.futures.Future, text: str, answer,
                errors: list[str], index: int | None = None) -> float:
        """The call's value (item `index` of a batched call's), or `fallback` with what went wrong appended to
        `errors`. A batched call bounds its own time (the remote client's time-out and retries)."""
        try:
            if index is None:
                return float(future.result(timeout=self.cfg.timeout_s))
            value = future.result()[index]
            if value is None:
                raise RuntimeError("the batch holding it failed (see the warning above)")
            return float(value)
        except concurrent.futures.TimeoutError:
            errors.append(f"reward {name} timed out after {self.cfg.timeout_s:.1f}s on response {text[:200]!r} "
                          f"(answer {answer!r})")
        except Exception as exc:  # a user's reward function may raise anything
            errors.append(f"reward {name} raised {type(exc).__name__}: {exc} on response {text[:200]!r} "
                          f"(answer {answer!r})")
        return self.cfg.fallback

    def score(self, prompts: list[str], texts: list[str], answers: list, metas: list[dict]) -> list[float]:
        """Weighted sum of the reward functions per sample. Every call is submitted before any is awaited,
        so slow rewards (math verification, sandboxes) run `max_workers` at a time instead of one by one."""
        metas = [{**meta, "prompt": prompt} for prompt, meta in zip(prompts, metas)]
        batched = {name: self._pool.submit(fn.score_batch, texts, answers, metas)
                   for name, _, fn in self.functions if hasattr(fn, "score_batch")}
        calls = []
        for i, (text, answer, meta) in enumerate(zip(texts, answers, metas)):
            calls.append([(name, weight, batched[name], i) if name in batched else
                          (name, weight, self._pool.submit(fn, text, answer, meta), None)
                          for name, weight, fn in self.functions])
        errors: list[str] = []
        scores = [sum(weight * self._result(name, future, text, answer, errors, index)
                      for name, weight, future, index in sample_calls)
                  for sample_calls, text, answer in zip(calls, texts, answers)]
        self.last_failed, self.last_calls = len(errors), len(texts) * len(self.functions)
        self.failures += len(errors)
        if errors:
            logger.warning("%d of %d reward calls failed and scored %s; the first: %s",
                           len(errors), self.last_calls, self.cfg.fallback, errors[0])
        return scores

    def end_step(self, failed: int, calls: int) -> None:
        """Count a training step's failed calls; raise once every call failed `max_failed_steps` steps in a row."""
        self._failed_steps = self._failed_steps + 1 if calls and failed == calls else 0
        limit = self.cfg.max_failed_steps
        if limit and self._failed_steps >= limit:
            raise RewardsFailedError(
                f"every reward call failed in the last {self._failed_steps} steps (see the warnings above for "
                f"one example each): fix the reward function, or raise reward.max_failed_steps (0 = never stop)")
