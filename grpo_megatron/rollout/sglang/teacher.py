"""A teacher behind SGLang's /generate that scores given tokens (prefill only), for on-policy distillation.

Request (sglang 0.5.23, srt/managers/io_struct.py GenerateReqInput): `input_ids` = prompt + the student's response,
`sampling_params.max_new_tokens` 0 (a prefill-only request: Req.is_prefill_only), `return_logprob`, and
`logprob_start_len` = len(prompt) - 1. SGLang answers `meta_info.input_token_logprobs` for the input tokens from
position logprob_start_len on, the first of them None (scheduler_components/logprob_result_processor.py
`_process_input_token_logprobs`: `[None] + logprobs[:-1]`: no logits before it were computed), so starting one
token before the response gives every response token its log-prob. With `top_logprobs_num` k,
`meta_info.input_top_logprobs` holds per position (the first None) the k most likely `[logprob, id, text]`.
The ids SGLang echoes in input_token_logprobs are clipped: an id >= vocab_size - 1 is reported as 0 (the same
function, "clip padded hash values from image tokens"; seen live for the tiny vocabulary's last token), so the
check of the echoed ids allows exactly that.

Input log-probs are log_softmax of the raw logits whatever `sampling_params.temperature` says
(layers/logprob_processor.py computes them without the temperature; slime #2319 / #2325 saw the same live), so
the trainer accepts this teacher only at rollout.temperature 1 (config check in training/opd.py).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import torch

from grpo_megatron.rollout.sglang.errors import MalformedResponseError
from grpo_megatron.rollout.sglang.transport import ServerPool


@dataclass
class TeacherScores:
    """One sample's teacher log-probs: `[R]` of its response tokens, and `[R, k]` top-k values and ids (or None)."""

    logprobs: torch.Tensor
    topk_logprobs: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None


def empty_scores(top_k: int) -> TeacherScores:
    """The scores of an empty response (nothing to ask a server)."""
    if not top_k:
        return TeacherScores(torch.zeros(0))
    return TeacherScores(torch.zeros(0), torch.zeros(0, top_k), torch.zeros(0, top_k, dtype=torch.long))


def scoring_payload(prompt_ids: list[int], response_ids: list[int], top_k: int) -> dict[str, Any]:
    """The /generate request that scores `response_ids` after `prompt_ids` without generating."""
    if not prompt_ids:
        raise ValueError("a teacher needs at least one prompt token before the response to score")
    payload: dict[str, Any] = {
        "input_ids": list(prompt_ids) + list(response_ids),
        "sampling_params": {"max_new_tokens": 0, "temperature": 1.0},
        "return_logprob": True,
        "logprob_start_len": len(prompt_ids) - 1,
    }
    if top_k:
        payload["top_logprobs_num"] = top_k
    return payload


def _echoed(token: int, vocab_size: int | None) -> int:
    """The id SGLang 0.5.23 echoes for an input token (logprob_result_processor._process_input_token_logprobs)."""
    return 0 if vocab_size is not None and token >= vocab_size - 1 else token


def parse_scores(body: Any, response_ids: list[int], top_k: int, url: str,
                 vocab_size: int | None = None) -> TeacherScores:
    """TeacherScores from one /generate answer to `scoring_payload`; anything unexpected is an error naming it."""
    meta = body.get("meta_info") if isinstance(body, dict) else None
    entries = meta.get("input_token_logprobs") if isinstance(meta, dict) else None
    n = len(response_ids)
    if not isinstance(entries, list) or len(entries) != n + 1:
        raise MalformedResponseError(
            f"{url}/generate: meta_info.input_token_logprobs has "
            f"{len(entries) if isinstance(entries, list) else 'no'} entries; expected {n + 1} (the last prompt token "
            f"and {n} response tokens from logprob_start_len)")
    scored = entries[1:]
    ids = [int(e[1]) for e in scored]
    if ids != [_echoed(t, vocab_size) for t in response_ids] or any(e[0] is None for e in scored):
        raise MalformedResponseError(f"{url}/generate: input_token_logprobs scored tokens {ids[:8]}... instead of "
                                     f"the response {list(response_ids)[:8]}... (or held nulls)")
    scores = TeacherScores(torch.tensor([float(e[0]) for e in scored], dtype=torch.float32))
    if top_k:
        rows = meta.get("input_top_logprobs")
        if not isinstance(rows, list) or len(rows) != n + 1 or any(
                not isinstance(r, list) or len(r) < top_k for r in rows[1:]):
            raise MalformedResponseError(f"{url}/generate: meta_info.input_top_logprobs is not {n + 1} rows (the first "
                                         f"null) of >= {top_k} [logprob, id, text] entries")
        rows = [r[:top_k] for r in rows[1:]]
        scores.topk_logprobs = torch.tensor([[float(e[0]) for e in r] for r in rows], dtype=torch.float32)
        scores.topk_ids = torch.tensor([[int(e[1]) for e in r] for r in rows], dtype=torch.long)
    return scores


class SGLangTeacher:
    """Scores samples on one or more SGLang servers, `max_in_flight` requests at a time."""

    def __init__(self, urls: list[str], top_k: int, api_key: str | None = None, timeout_s: float = 300.0,
                 max_in_flight: int = 64, vocab_size: int | None = None):
        self.pool = ServerPool(urls, api_key=api_key, timeout_s=timeout_s)
        self.top_k = top_k
        self.vocab_size = vocab_size  # the served model's config.vocab_size: see _echoed
        self.max_in_flight = max_in_flight

    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[TeacherScores]:
        """Teacher scores of each (prompt_ids, response_ids), in order."""
        return asyncio.run(self._score(pairs))

    async def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[TeacherScores]:
        limit = asyncio.Semaphore(self.max_in_flight)
        async with self.pool.client(self.max_in_flight) as client:
            async def one(prompt_ids: list[int], response_ids: list[int]) -> TeacherScores:
                if not response_ids:
                    return empty_scores(self.top_k)
                async with limit:
                    return await self.pool.post(
                        client, "/generate", scoring_payload(prompt_ids, response_ids, self.top_k),
                        lambda url, body: parse_scores(body, response_ids, self.top_k, url, self.vocab_size))

            return list(await asyncio.gather(*(one(p, r) for p, r in pairs)))
