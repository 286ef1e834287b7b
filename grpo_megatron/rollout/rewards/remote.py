"""Rewards from an HTTP reward server (as slime's `--rm-url`): batched, retried with back-off, never fatal.

Configured as a reward function named `remote` (reward.functions: [{name: remote, options: {url: ...}}]). A
step's samples go to the server in batches of `batch_size`, up to `max_in_flight` batches at a time:

    POST <url>  {"items": [{"prompt": str, "response": str, "answer": str | null, "meta": {...}}, ...]}
    200         {"rewards": [float, ...]}   (one per item, in order; a bare JSON list is accepted too)

A connection error, a time-out (`timeout_s` per request), 429 or 5xx is retried `retries` times after
`backoff_s`, 2 x `backoff_s`, ... (at most `max_backoff_s`); another 4xx, a body that is not JSON, or a wrong
number of rewards or a non-finite one fails the batch at once. A failed batch scores None per sample, which
the RewardRunner turns into `reward.fallback` (counted and logged like any failed reward call); called alone,
`score` puts `fallback` there instead.
"""
from __future__ import annotations

import concurrent.futures
import logging
import math
import time
from typing import Any

import httpx

logger = logging.getLogger(__name__)

_RETRY_STATUS = {429, 500, 502, 503, 504}


class RemoteRewardError(RuntimeError):
    """One batch could not be scored; the message says why (after how many tries)."""


class RemoteReward:
    def __init__(self, url: str, batch_size: int = 32, timeout_s: float = 30.0, retries: int = 3,
                 backoff_s: float = 0.5, max_backoff_s: float = 8.0, max_in_flight: int = 4,
                 fallback: float = 0.0, headers: dict[str, str] | None = None):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"reward remote: url={url!r} must start with http:// or https://")
        if batch_size < 1 or retries < 0 or timeout_s <= 0 or max_in_flight < 1 or backoff_s < 0:
            raise ValueError("reward remote: need batch_size >= 1, retries >= 0, timeout_s > 0, backoff_s >= 0 and "
                             f"max_in_flight >= 1, got {batch_size}, {retries}, {timeout_s}, {backoff_s}, "
                             f"{max_in_flight}")
        self.url, self.batch_size, self.timeout_s, self.retries = url, batch_size, timeout_s, retries
        self.backoff_s, self.max_backoff_s, self.fallback = backoff_s, max_backoff_s, fallback
        self.max_in_flight, self.headers = max_in_flight, dict(headers or {})

    def score_batch(self, texts: list[str], answers: list, metas: list[dict]) -> list[float | None]:
        """One reward per sample, None where its batch failed (each failed batch logged once)."""
        items = [{"prompt": meta.get("prompt", ""), "response": text, "answer": answer,
                  "meta": {k: v for k, v in meta.items() if k != "prompt"}}
                 for text, answer, meta in zip(texts, answers, metas)]
        batches = [items[i:i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        with httpx.Client(timeout=self.timeout_s, headers=self.headers) as client, \
                concurrent.futures.ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="remote-reward") as pool:
            futures = [pool.submit(self._post, client, batch) for batch in batches]
            scores: list[float | None] = []
            for batch, future in zip(batches, futures):
                try:
                    scores += future.result()
                except RemoteRewardError as err:
                    logger.warning("reward server %s: a batch of %d scored as failed: %s", self.url, len(batch), err)
                    scores += [None] * len(batch)
        return scores

    def score(self, texts: list[str], answers: list, metas: list[dict]) -> list[float]:
        """As score_batch, with `fallback` for the samples of failed batches."""
        return [self.fallback if s is None else s for s in self.score_batch(texts, answers, metas)]

    def _post(self, client: httpx.Client, batch: list[dict]) -> list[float]:
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)))
            try:
                response = client.post(self.url, json={"items": batch})
            except httpx.TimeoutException:
                last = f"no answer within {self.timeout_s:.1f} s"
                continue
            except httpx.TransportError as err:
                last = f"{type(err).__name__}: {err}"
                continue
            if response.status_code in _RETRY_STATUS:
                last = f"HTTP {response.status_code}"
                continue
            if response.status_code != 200:
                raise RemoteRewardError(f"HTTP {response.status_code} (not retried): {response.text[:200]}")
            return _rewards(response, len(batch))
        raise RemoteRewardError(f"{self.retries + 1} tries failed, the last with {last}")


def _rewards(response: httpx.Response, count: int) -> list[float]:
    try:
        body: Any = response.json()
    except ValueError:
        raise RemoteRewardError(f"the answer is not JSON: {response.text[:200]!r}") from None
    rewards = body.get("rewards") if isinstance(body, dict) else body
    if not isinstance(rewards, list) or len(rewards) != count:
        raise RemoteRewardError(f"expected {{\"rewards\": [{count} numbers]}}, got {str(body)[:200]}")
    if not all(isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) for r in rewards):
        raise RemoteRewardError(f"the rewards must be finite numbers, got {str(rewards)[:200]}")
    return [float(r) for r in rewards]
