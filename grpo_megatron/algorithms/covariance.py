"""Clip-Cov and KL-Cov (Cui et al., arXiv 2505.22617): restrain the few tokens whose log-prob and advantage
covary most, the ones that drive the policy's entropy down (selection in token_selection.py).

  clip_cov:  loss = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), times 0 (no gradient) on the selected
             tokens (the authors' code keeps PPO's clip on the others).
  kl_cov:    loss = -r A, plus beta |log r| on the selected tokens (no clip).
"""
from __future__ import annotations

import torch

from grpo_megatron.algorithms.loss_params import LossParams
from grpo_megatron.algorithms.policy_loss import (
    PPO_CLIP,
    ClipRange,
    Surrogate,
    _bounded_exp,
    clipped_surrogate,
    register_policy_loss,
    token_advantages,
)


def _selected_fraction(selection: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {"cov_selected_frac": (selection & mask).sum().to(dtype) / mask.sum().clamp(min=1)}


@register_policy_loss("clip_cov", PPO_CLIP, dual_clip=True, needs_selection=True)
def clip_cov_surrogate(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor,
    clip: ClipRange, params: LossParams, selection: torch.Tensor,
) -> Surrogate:
    ratio = _bounded_exp(logprobs - old_logprobs)
    loss, low, high, dual = clipped_surrogate(ratio, token_advantages(advantages), clip)
    return Surrogate(loss * ~selection, low, high, dual, ratio.detach(), response_mask,
                     _selected_fraction(selection, response_mask, logprobs.dtype))


@register_policy_loss("kl_cov", None, needs_selection=True)
def kl_cov_surrogate(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor,
    clip: None, params: LossParams, selection: torch.Tensor,
) -> Surrogate:
    log_ratio = logprobs - old_logprobs
    ratio = _bounded_exp(log_ratio)
    loss = -ratio * token_advantages(advantages) + params.kl_cov_coef * log_ratio.abs() * selection
    flags = torch.zeros_like(selection)
    return Surrogate(loss, flags, flags, flags, ratio.detach(), response_mask,
                     _selected_fraction(selection, response_mask, logprobs.dtype))
