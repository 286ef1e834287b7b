"""GMPO (Geometric-Mean Policy Optimization, Zhao et al., arXiv 2507.20673): the geometric mean of the
token ratios, each clipped in log space, instead of their arithmetic mean:

    J_i = A_i * exp(1/|o_i| sum_t sgn(A_i) min(sgn(A_i) log r_t, sgn(A_i) clip(log r_t, -eps_low, eps_high)))

i.e. (prod_t |min(r_t A_i, clip(r_t, e^-eps_low, e^eps_high) A_i)|)^(1/|o_i|) sgn(A_i). The
geometric mean is less sensitive to single outlier ratios, which allows the paper's wider range
(e^-0.4, e^0.4). One loss per sequence, repeated on its tokens (like GSPO).
"""
from __future__ import annotations

import torch

from grpo_megatron.algorithms.loss_params import LossParams
from grpo_megatron.algorithms.policy_loss import ClipRange, Surrogate, _bounded_exp, register_policy_loss

GMPO_PAPER_CLIP = (0.4, 0.4)
"""(eps_low, eps_high) in log space: token ratios kept within (e^-0.4, e^0.4)."""


@register_policy_loss("gmpo", GMPO_PAPER_CLIP)
def gmpo_surrogate(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor,
    clip: ClipRange, params: LossParams, selection: torch.Tensor | None,
) -> Surrogate:
    """GMPO; needs per-sequence advantages `[B]`."""
    if advantages.dim() != 1:
        raise ValueError(f"policy loss 'gmpo' needs per-sequence advantages [B], got shape {tuple(advantages.shape)}")
    log_ratio = logprobs - old_logprobs
    sign = advantages.sign().unsqueeze(-1)
    clipped = log_ratio.clamp(-clip.low, clip.high)
    pessimistic = sign * torch.minimum(sign * log_ratio, sign * clipped)
    lengths = response_mask.sum(-1).clamp(min=1)
    ratio = _bounded_exp((pessimistic * response_mask).sum(-1) / lengths)
    loss = (-advantages * ratio).unsqueeze(-1).expand_as(logprobs)
    clipped_low = (sign < 0) & (log_ratio < -clip.low)
    clipped_high = (sign > 0) & (log_ratio > clip.high)
    geometric_mean = _bounded_exp((log_ratio * response_mask).sum(-1) / lengths)
    return Surrogate(loss, clipped_low, clipped_high, torch.zeros_like(clipped_low), geometric_mean.detach(),
                     response_mask.any(-1))
