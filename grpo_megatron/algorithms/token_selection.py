"""Which tokens the covariance losses single out (Cui et al., "The Entropy Mechanism of RL for Reasoning
LMs", arXiv 2505.22617): the centred covariance of each token's log-prob and advantage,

    Cov(y_t) = (log pi(y_t) - 1/N sum_j log pi(y_j)) * (A_t - 1/N sum_j A_j)   over the N loss tokens,

Clip-Cov detaches r*N tokens drawn at random among those with lb < Cov < ub; KL-Cov penalises the
k*N tokens of largest Cov. N and both means span the whole batch the loss is over, so the trainer
selects once per mini-batch, before its split into micro-batches and data-parallel ranks.
"""
from __future__ import annotations

import torch

from grpo_megatron.algorithms.loss_params import LossParams


def covariance_scores(logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cov(y_t) of every position `[B, T]` (the means over `mask`; values off the mask are meaningless)."""
    token_adv = (advantages if advantages.dim() == 2 else advantages.unsqueeze(-1)).expand_as(logprobs)
    weights = mask.to(logprobs.dtype)
    count = weights.sum().clamp(min=1)
    mean_logp = (logprobs * weights).sum() / count
    mean_adv = (token_adv * weights).sum() / count
    return (logprobs - mean_logp) * (token_adv - mean_adv)


def select_tokens(
    loss: str, logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, params: LossParams,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Boolean `[B, T]`: the tokens `loss` (clip_cov or kl_cov) singles out in this batch.

    clip_cov: max(int(r N), 1) tokens drawn uniformly (with `generator`) among those with
    lb < Cov < ub, or all of them where fewer; kl_cov: the max(int(k N), 1) tokens of largest Cov.
    """
    mask = mask.bool()
    scores = covariance_scores(logprobs.detach(), advantages.detach(), mask).flatten()
    num_tokens = int(mask.sum())
    selected = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if num_tokens == 0:
        return selected.view_as(mask)
    if loss == "clip_cov":
        count = max(int(params.clip_cov_ratio * num_tokens), 1)
        in_band = mask.flatten() & (scores > params.clip_cov_lb) & (scores < params.clip_cov_ub)
        candidates = in_band.nonzero().squeeze(-1)
        order = torch.randperm(candidates.numel(), generator=generator).to(candidates.device)
        chosen = candidates[order[:count]]
    elif loss == "kl_cov":
        count = max(int(params.kl_cov_ratio * num_tokens), 1)
        chosen = scores.masked_fill(~mask.flatten(), float("-inf")).topk(count).indices
    else:
        raise ValueError(f"policy loss {loss!r} selects no tokens; use clip_cov or kl_cov")
    selected[chosen] = True
    return selected.view_as(mask)
