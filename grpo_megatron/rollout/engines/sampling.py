"""Next-token sampling from logits: temperature, top-k, top-p, and the log-prob the trainer expects.

The returned log-prob is always taken from the *untruncated* distribution log_softmax(logits / T), because
that is what the trainer recomputes from its own forward; top-k/top-p only decide which token is drawn.
"""
from __future__ import annotations

import torch

from grpo_megatron.rollout.engines.base import SamplingParams


def truncate_logits(scaled_logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every token outside the top-k, then outside the top-p nucleus of what remains.

    The nucleus is the smallest set of most likely tokens whose probability reaches top_p (the most likely
    token is always kept), computed after top-k as in HF and vLLM.
    """
    logits = scaled_logits
    if top_k != -1 and top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_probs, sorted_index = torch.softmax(logits, dim=-1).sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_index, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next_tokens(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row of float logits [B, V]; return (tokens [B], log-probs [B]).

    temperature 0 is greedy and reports log_softmax(logits) (temperature 1) as the log-prob.
    """
    if params.temperature == 0:
        tokens = logits.argmax(dim=-1)
        logprobs = torch.log_softmax(logits, dim=-1)
    else:
        scaled = logits / params.temperature
        logprobs = torch.log_softmax(scaled, dim=-1)
        probs = torch.softmax(truncate_logits(scaled, params.top_k, params.top_p), dim=-1)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)
