"""Token-level losses that bound the update by other means than PPO's hard clip of the ratio r = pi / pi_old:

- CISPO (MiniMax-M1, arXiv 2506.13585): clips the importance-sampling weight and stops its gradient, so
  every token keeps a policy gradient: J = sg(clip(r, 1 - eps_low, 1 + eps_high)) A log pi.
- SAPO (Soft Adaptive Policy Optimization, Qwen, arXiv 2511.20347): a smooth gate instead of the clip:
  J = f(r) A, f(r) = 4/tau sigmoid(tau (r - 1)), tau = tau_pos for A > 0 else tau_neg.
- DPPO (Divergence Proximal Policy Optimization, "Rethinking the Trust Region in LLM RL", arXiv
  2602.04879): J = M r A, where the detached mask M drops the tokens whose update would carry the policy
  out of a trust region measured by the divergence of pi from pi_old on the sampled token (binary TV or
  binary KL) rather than by the ratio.

All return a per-token loss (-J); the flags report where the bound acted (CISPO: weight truncated, the
gradient remains; DPPO: token masked out).
"""
from __future__ import annotations

import torch

from grpo_megatron.algorithms.loss_params import LossParams
from grpo_megatron.algorithms.policy_loss import (
    ClipRange,
    Surrogate,
    _bounded_exp,
    register_policy_loss,
    token_advantages,
)

CISPO_CLIP = (1.0, 0.2)
"""eps_low = 1: the weight is clipped at 0, i.e. no lower bound (the paper sets eps_low large and tunes
eps_high only); eps_high = 0.2 (verl's CISPO example)."""
DPPO_TV_DELTA = (0.15, 0.15)
"""Binary-TV trust region |pi(y) - pi_old(y)| <= delta (the paper's DPPO-TV setting)."""
DPPO_KL_DELTA = (0.05, 0.05)
"""Binary-KL trust region KL(Bern(pi_old(y)) || Bern(pi(y))) <= delta (the paper's DPPO-KL setting)."""


def _no_flags(logprobs: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(logprobs, dtype=torch.bool)


@register_policy_loss("cispo", CISPO_CLIP)
def cispo_surrogate(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor,
    clip: ClipRange, params: LossParams, selection: torch.Tensor | None,
) -> Surrogate:
    """CISPO: loss = -sg(clip(r, 1 - eps_low, 1 + eps_high)) A log pi, gradient -r_hat A grad log pi."""
    ratio = _bounded_exp(logprobs - old_logprobs).detach()
    weight = ratio.clamp(1.0 - clip.low, 1.0 + clip.high)
    loss = -weight * token_advantages(advantages) * logprobs
    return Surrogate(loss, ratio < 1.0 - clip.low, ratio > 1.0 + clip.high, _no_flags(logprobs), ratio, response_mask)


@register_policy_loss("sapo", None)
def sapo_surrogate(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor,
    clip: None, params: LossParams, selection: torch.Tensor | None,
) -> Surrogate:
    """SAPO: loss = -4/tau sigmoid(tau (r - 1)) A; its gradient is -w(r) r A grad log pi with
    w = 4 sigmoid (1 - sigmoid), 1 on-policy and decaying smoothly away from r = 1."""
    ratio = _bounded_exp(logprobs - old_logprobs)
    adv = token_advantages(advantages)
    tau = torch.where(adv > 0, adv.new_tensor(params.sapo_tau_pos), adv.new_tensor(params.sapo_tau_neg))
    gate = torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
    flags = _no_flags(logprobs)
    return Surrogate(-gate * adv, flags, flags, flags, ratio.detach(), response_mask)


def _binary_kl(old_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """KL(Bern(q) || Bern(p)) with q = pi_old(y), p = pi(y): the KL of the two policies with every token
    but the sampled one lumped together (0 log 0 = 0; p = 1 > q gives inf). Log-probs are clamped to
    <= 0 first: rounding can put one a hair above 0, where 1 - p < 0 has no logarithm."""
    old_logprobs, logprobs = old_logprobs.clamp(max=0.0), logprobs.clamp(max=0.0)
    q = old_logprobs.exp()
    rest_q, rest_p = -torch.expm1(old_logprobs), -torch.expm1(logprobs)
    return q * (old_logprobs - logprobs) + torch.xlogy(rest_q, rest_q) - torch.xlogy(rest_q, rest_p)


def _dppo(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor,
          outside_up: torch.Tensor, outside_down: torch.Tensor) -> Surrogate:
    """loss = -M r A; M = 0 where A > 0 and the update raised pi(y) past the region (`outside_up`), or
    A < 0 and it lowered pi(y) past it (`outside_down`): updates back towards pi_old are kept."""
    ratio = _bounded_exp(logprobs - old_logprobs)
    adv = token_advantages(advantages)
    masked_high = (adv > 0) & outside_up
    masked_low = (adv < 0) & outside_down
    keep = ~(masked_high | masked_low)
    loss = -ratio * adv * keep
    return Surrogate(loss, masked_low, masked_high, _no_flags(logprobs), ratio.detach(), response_mask)


@register_policy_loss("dppo_tv", DPPO_TV_DELTA)
def dppo_tv_surrogate(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor,
    clip: ClipRange, params: LossParams, selection: torch.Tensor | None,
) -> Surrogate:
    """DPPO-Binary-TV: out of the region where pi(y) - pi_old(y) > delta_high (up) or < -delta_low (down)."""
    change = (logprobs.exp() - old_logprobs.exp()).detach()
    return _dppo(logprobs, old_logprobs, advantages, response_mask, change > clip.high, change < -clip.low)


@register_policy_loss("dppo_kl", DPPO_KL_DELTA)
def dppo_kl_surrogate(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor,
    clip: ClipRange, params: LossParams, selection: torch.Tensor | None,
) -> Surrogate:
    """DPPO-Binary-KL: out of the region where the binary KL exceeds delta_high with pi(y) > pi_old(y)
    (up) or delta_low with pi(y) < pi_old(y) (down)."""
    kl = _binary_kl(old_logprobs, logprobs.detach())
    rising = logprobs.detach() > old_logprobs
    falling = logprobs.detach() < old_logprobs
    return _dppo(logprobs, old_logprobs, advantages, response_mask, (kl > clip.high) & rising,
                 (kl > clip.low) & falling)
