"""Partial rollouts: generation that goes on across weight pushes, each sample resumed from the tokens it kept.

Partial rollouts (rollout.partial_rollouts): a weight push from another thread while generate runs aborts the
running requests on every server and pauses them (/pause_generation, mode "abort"), so running requests answer
at once with the tokens they have (their ids, log-probs and routed-experts rows, under the old version) and new
ones wait; the push goes on, generation continues, and each unfinished sample is resubmitted (its own seed)
with input_ids = prompt + the tokens kept and max_new_tokens = what is left, under the new version. The
completion is the segments back to back, with `token_versions`.

Replay rule across versions (R3): routed_experts row j is the forward at position j that sampled token j + 1,
so a row comes from the segment that sampled that token, never from a later segment's prefill of the kept
tokens (which ran under newer weights than the token's): a resumed request asks for routed_experts_start_len =
len(prompt) + kept - 1 and returns exactly the rows of the tokens it samples. Prompt rows come from the first
segment that sampled a token, so they carry the version of the first response token, as with the embedded engine.

Why not SGLang 0.5.23's own pause modes, which keep requests on the server and report per-token
`meta_info.weight_versions`: "in_place" keeps running requests' KV cache from the old weights and makes the
update's cache flush fail while they run (so cached prefixes would serve new requests stale KV); "retract"
re-prefills the kept tokens under the new weights and collects `routed_experts` from that re-prefill
(Req.reset_for_retract drops the rows), which breaks the replay rule above.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import torch

from grpo_megatron.rollout.engines.base import Completion
from grpo_megatron.rollout.sglang.errors import ServerUnavailableError
from grpo_megatron.rollout.sglang.protocol import ABORTED

logger = logging.getLogger(__name__)


class RequestGate:
    """Open while generation may post requests; a push closes it, drains the requests in flight, reopens it."""

    def __init__(self):
        self._open = threading.Event()
        self._open.set()
        self._running = 0  # requests posted and not yet answered
        self._answered = threading.Condition()  # guards _running

    @contextlib.asynccontextmanager
    async def request(self):
        """Around one posted request: waits while the gate is closed, then counts the request until it answers."""
        if not self._open.is_set():
            await asyncio.to_thread(self._open.wait)
        with self._answered:
            self._running += 1
        try:
            yield
        finally:
            with self._answered:
                self._running -= 1
                self._answered.notify_all()

    @contextlib.contextmanager
    def closed(self, drain: Callable[[], None]):
        """Closed for the block, entered once no request is running; `drain` (aborting the running ones) is
        called again for a request that reached a server just after the previous call."""
        self._open.clear()
        try:
            while True:
                drain()
                with self._answered:
                    if self._answered.wait_for(lambda: self._running == 0, timeout=0.05):
                        break
            yield
        finally:
            self._open.set()


async def resume_until_done(segment: Callable[[list[int]], Awaitable[tuple[Completion, bool]]], prompt: list[int],
                            max_new_tokens: int, attempts: int) -> Completion:
    """One sample from `segment(kept)` requests ((completion, aborted) for the rest after `kept`), resumed after
    each abort until it finishes; a server that aborts `attempts` times in a row without a new token is an error."""
    sample = ResumedSample(prompt)
    part, aborted = await segment([])
    sample.add(part)
    idle = 0  # aborts in a row that brought no token: a server that keeps aborting is an error
    while aborted and len(sample.response_ids) < max_new_tokens:
        logger.info("resuming a sample aborted by a pause after %d tokens", len(sample.response_ids))
        part, aborted = await segment(list(sample.response_ids))
        idle = 0 if part.response_ids else idle + 1
        if idle >= attempts:
            raise ServerUnavailableError(f"/generate was aborted {idle} times in a row without a new token "
                                         f"(prompt of {len(prompt)} tokens)")
        sample.add(part)
    return sample.completion(max_new_tokens)


@dataclass
class ResumedSample:
    """One sample over the requests (segments) that generated it, split by pauses for weight pushes."""

    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    routes: list[torch.Tensor] = field(default_factory=list)
    finish_reason: str = ABORTED

    def add(self, segment: Completion) -> None:
        """Append a segment's tokens under its version; its routes only when it sampled tokens (see R3 rule)."""
        if segment.response_ids and segment.routed_experts is not None:
            self.routes.append(segment.routed_experts)
        self.response_ids += segment.response_ids
        self.logprobs += segment.response_logprobs
        self.versions += [segment.weight_version] * len(segment.response_ids)
        self.finish_reason = segment.finish_reason

    def completion(self, max_new_tokens: int) -> Completion:
        # A sample aborted right at its last token is complete: it was cut at max_new_tokens.
        reason = "length" if self.finish_reason == ABORTED and len(self.response_ids) == max_new_tokens \
            else self.finish_reason
        return Completion(prompt_ids=list(self.prompt_ids), response_ids=self.response_ids,
                          response_logprobs=self.logprobs, finish_reason=reason,
                          routed_experts=torch.cat(self.routes) if self.routes else None,
                          weight_version=self.versions[0], token_versions=self.versions)
