"""Policy losses: the registry protocol, `compute_policy_loss`, and the PPO-clipped family (GRPO token
ratio, GSPO sequence ratio, GSPO-token).

Every variant returns a per-token loss `[B, T]`; `loss_agg` (see aggregation.py) then reduces it.
Sequence-level variants repeat their per-sequence loss on every response token, so
`seq_mean_token_mean` gives GSPO's `1/G sum_i` exactly. The other families register in
is_weighted.py (CISPO, SAPO, DPPO), gmpo.py and covariance.py (Clip-Cov, KL-Cov).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch

from grpo_megatron.algorithms.aggregation import aggregate_loss
from grpo_megatron.algorithms.kl import MAX_LOG_RATIO, estimate_kl
from grpo_megatron.algorithms.loss_params import LossParams
from grpo_megatron.algorithms.registry import KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES
from grpo_megatron.algorithms.token_selection import select_tokens

DAPO_CLIP = (0.2, 0.28)
"""DAPO clip-higher (eps_low, eps_high) for token ratios: [0.8, 1.28]."""
GSPO_PAPER_CLIP = (3e-4, 4e-4)
"""GSPO paper's (eps_low, eps_high): sequence ratios are geometric means, so far tighter bounds."""
PPO_CLIP = (0.2, 0.2)
"""PPO / GRPO paper's symmetric clip."""


@dataclass(frozen=True)
class ClipRange:
    """Ratio bounds [1 - low, 1 + high] (clip-higher when high > low); optional dual-clip constant c > 1."""

    low: float
    high: float
    dual_c: float | None = None


@dataclass(frozen=True)
class Surrogate:
    """What a policy-loss variant returns.

    `token_loss` and the clip flags are `[B, T]` (values on padding are ignored); `ratio` is the
    ratio that was clipped, `[B, T]` for token-level or `[B]` for sequence-level variants, with
    `ratio_mask` marking its meaningful entries (both detached, for metrics).
    """

    token_loss: torch.Tensor
    clipped_low: torch.Tensor
    clipped_high: torch.Tensor
    clipped_dual: torch.Tensor
    ratio: torch.Tensor
    ratio_mask: torch.Tensor
    extra_metrics: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class PolicyLoss:
    """A registered loss: `surrogate(logprobs, old_logprobs, advantages, mask, clip, params, selection)`.

    default_clip: the (low, high) its paper uses where the config leaves them unset; None for losses
    without a clip range. dual_clip: whether dual_clip_c applies. needs_selection: the loss singles out
    tokens over the whole global batch (`select_tokens` in token_selection.py), once per mini-batch.
    """

    surrogate: Callable[..., Surrogate]
    default_clip: tuple[float, float] | None
    dual_clip: bool = False
    needs_selection: bool = False


def register_policy_loss(name: str, default_clip: tuple[float, float] | None, **flags: bool) -> Callable:
    """Decorator: register a surrogate under `name` in POLICY_LOSSES; the function itself is returned."""
    def add(surrogate: Callable[..., Surrogate]) -> Callable[..., Surrogate]:
        POLICY_LOSSES.add(name, PolicyLoss(surrogate, default_clip, **flags))
        return surrogate
    return add


def resolve_clip(variant: str, clip_low: float | None, clip_high: float | None,
                 dual_clip_c: float | None) -> ClipRange | None:
    """The clip range of `variant`: the given bounds, the paper's where unset, None without a clip range."""
    loss = POLICY_LOSSES.get(variant)
    if dual_clip_c is not None and not loss.dual_clip:
        raise ValueError(f"dual_clip_c acts only with the PPO-clipped losses "
                         f"({', '.join(n for n in POLICY_LOSSES.names() if POLICY_LOSSES.get(n).dual_clip)}), "
                         f"not {variant!r}; remove it")
    if loss.default_clip is None:
        if clip_low is not None or clip_high is not None:
            raise ValueError(f"policy loss {variant!r} has no clip range; remove clip_low / clip_high")
        return None
    low = loss.default_clip[0] if clip_low is None else clip_low
    high = loss.default_clip[1] if clip_high is None else clip_high
    if low < 0 or high < 0:
        raise ValueError(f"clip_low and clip_high must be >= 0, got {low} and {high}")
    if dual_clip_c is not None and dual_clip_c <= 1:
        raise ValueError(f"dual_clip_c must be > 1, got {dual_clip_c}")
    return ClipRange(low, high, dual_clip_c)


def clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, clip: ClipRange
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate as a loss, with clip flags (low, high, dual).

        loss = -min(w A, clip(w, 1 - eps_low, 1 + eps_high) A)

    Dual clip (Ye et al., 2020) also bounds the loss of negative advantages, where a huge ratio
    would otherwise be unbounded: for A < 0, loss = min(loss, -c A).
    A flag is set where that bound is the active term, i.e. where it cuts the gradient.
    """
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip.low, 1.0 + clip.high) * advantages
    objective = torch.minimum(unclipped, clipped)
    negative = advantages < 0
    clipped_low = negative & (ratio < 1.0 - clip.low)
    clipped_high = (advantages > 0) & (ratio > 1.0 + clip.high)
    if clip.dual_c is None:
        clipped_dual = torch.zeros_like(clipped_low)
    else:
        dual_bound = clip.dual_c * advantages
        clipped_dual = negative & (objective < dual_bound)
        objective = torch.where(clipped_dual, dual_bound, objective)
    return -objective, clipped_low, clipped_high, clipped_dual


def sequence_log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """GSPO's log s_i = 1/|y_i| sum_t log(pi(y_it) / pi_old(y_it)), `[B]` (0 for empty rows).

    Seed: s_i(theta) = exp(1/|y_i| sum_t log(pi_theta(y_it | x, y_i<t) / pi_old(y_it | x, y_i<t)))
                     = (prod_t r_it)^(1/|y_i|)
    Expects padding already zeroed in both log-prob tensors.
    """
    lengths = response_mask.sum(-1).clamp(min=1)
    return (logprobs - old_logprobs).sum(-1) / lengths


def _bounded_exp(log_ratio: torch.Tensor) -> torch.Tensor:
    return log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO).exp()


def token_advantages(advantages: torch.Tensor) -> torch.Tensor:
    """`[B, T]` advantages as they are, `[B]` ones as a `[B, 1]` column that broadcasts over tokens."""
    return advantages if advantages.dim() == 2 else advantages.unsqueeze(-1)


@register_policy_loss("grpo", PPO_CLIP, dual_clip=True)
def grpo_surrogate(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor, clip: ClipRange,
    params: LossParams, selection: torch.Tensor | None,
) -> Surrogate:
    """GRPO / DAPO: per-token ratio, clipped per token.

    Seed: min(w_it A_it, clip(w_it, 1 - eps, 1 + eps) A_it), w_it = pi_theta(y_it | ...) / pi_old(y_it | ...)
    """
    ratio = _bounded_exp(logprobs - old_logprobs)
    token_advantages = advantages if advantages.dim() == 2 else advantages.unsqueeze(-1)
    loss, low, high, dual = clipped_surrogate(ratio, token_advantages, clip)
    return Surrogate(loss, low, high, dual, ratio.detach(), response_mask)


@register_policy_loss("gspo", GSPO_PAPER_CLIP, dual_clip=True)
def gspo_surrogate(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor, clip: ClipRange,
    params: LossParams, selection: torch.Tensor | None,
) -> Surrogate:
    """GSPO: one ratio per sequence, clipped per sequence; needs per-sequence advantages `[B]`.

    Seed: J(theta) = E[1/G sum_i min(s_i(theta) A_i, clip(s_i(theta), 1 - eps, 1 + eps) A_i)]
    """
    if advantages.dim() != 1:
        raise ValueError(
            f"policy loss 'gspo' needs per-sequence advantages [B], got shape {tuple(advantages.shape)}; "
            "use 'gspo_token' for per-token advantages"
        )
    ratio = _bounded_exp(sequence_log_ratio(logprobs, old_logprobs, response_mask))
    loss, low, high, dual = clipped_surrogate(ratio, advantages, clip)
    per_token = [flags.unsqueeze(-1).expand_as(logprobs) for flags in (loss, low, high, dual)]
    return Surrogate(*per_token, ratio.detach(), response_mask.any(-1))


@register_policy_loss("gspo_token", GSPO_PAPER_CLIP, dual_clip=True)
def gspo_token_surrogate(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor, clip: ClipRange,
    params: LossParams, selection: torch.Tensor | None,
) -> Surrogate:
    """GSPO-token: per-token advantages A_it, sequence-level ratio and clipping.

    Seed: J_token = E[sum_t min(s_it(theta) A_it, clip(s_it(theta), 1 - eps, 1 + eps) A_it)],
          s_it(theta) = sg[s_i(theta)] * pi_theta(y_it | ...) / sg[pi_theta(y_it | ...)]
    s_it equals s_i in value, and its gradient is s_i * grad log pi(y_it), so with A_it = A_i this
    is GSPO in value and gradient. Computed in log space (sg[log s_i] + logp - sg[logp]) so it
    is bounded exactly like GSPO's ratio.
    """
    log_s = sequence_log_ratio(logprobs, old_logprobs, response_mask).detach()
    ratio = _bounded_exp(log_s.unsqueeze(-1) + logprobs - logprobs.detach())
    token_advantages = advantages if advantages.dim() == 2 else advantages.unsqueeze(-1)
    loss, low, high, dual = clipped_surrogate(ratio, token_advantages, clip)
    return Surrogate(loss, low, high, dual, _bounded_exp(log_s), response_mask.any(-1))


def _check_inputs(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    entropy: torch.Tensor | None,
    selection: torch.Tensor | None,
    kl_coef: float,
) -> None:
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got shape {tuple(logprobs.shape)}")
    named = {"old_logprobs": old_logprobs, "response_mask": response_mask, "ref_logprobs": ref_logprobs, "entropy": entropy,
             "token_selection": selection}
    for name, tensor in named.items():
        if tensor is not None and tensor.shape != logprobs.shape:
            raise ValueError(f"{name} must have the shape of logprobs {tuple(logprobs.shape)}, got {tuple(tensor.shape)}")
    if advantages.shape not in (logprobs.shape[:1], logprobs.shape):
        raise ValueError(f"advantages must be [B] or [B, T] = {tuple(logprobs.shape)}, got {tuple(advantages.shape)}")
    if kl_coef != 0 and ref_logprobs is None:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logprobs")


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the entries where the boolean `mask` is set (0 when there are none)."""
    return values.masked_fill(~mask, 0.0).sum() / mask.sum().clamp(min=1)


def _masked_max(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Max over the entries where `mask` is set (0 when there are none, even for an empty batch)."""
    candidates = torch.cat([values.masked_fill(~mask, float("-inf")).flatten(), values.new_full((1,), float("-inf"))])
    return torch.where(mask.any(), candidates.max(), 0.0)


def _metrics(
    surrogate: Surrogate,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    mask: torch.Tensor,
    entropy: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """Detached 0-dim metrics (no host sync). Clip fractions: of response tokens whose gradient a
    clip cut, and of non-empty sequences with at least one such token (for GSPO: clipped sequences)."""
    dtype = logprobs.dtype
    clipped = surrogate.clipped_low | surrogate.clipped_high | surrogate.clipped_dual
    ratio, ratio_mask = surrogate.ratio, surrogate.ratio_mask
    metrics = {
        "clip_frac_tokens": _masked_mean(clipped.to(dtype), mask),
        "clip_frac_seqs": _masked_mean((clipped & mask).any(-1).to(dtype), mask.any(-1)),
        "clip_frac_low": _masked_mean(surrogate.clipped_low.to(dtype), mask),
        "clip_frac_high": _masked_mean(surrogate.clipped_high.to(dtype), mask),
        "ratio_mean": _masked_mean(ratio, ratio_mask),
        "ratio_min": -_masked_max(-ratio, ratio_mask),
        "ratio_max": _masked_max(ratio, ratio_mask),
        "approx_kl_old": _masked_mean(estimate_kl(old_logprobs, logprobs.detach(), "k3"), mask),
    }
    if entropy is not None:
        metrics["entropy"] = _masked_mean(entropy.detach(), mask)
    return metrics


def compute_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    variant: str,
    loss_agg: str,
    clip_low: float | None = None,
    clip_high: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    dual_clip_c: float | None = None,
    entropy: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
    max_response_length: int | None = None,
    is_weights: torch.Tensor | None = None,
    params: LossParams | None = None,
    token_selection: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Policy loss `pg_loss + kl_coef * kl_loss` and detached metrics.

    logprobs, old_logprobs, ref_logprobs, response_mask, entropy: `[B, T]` (log-probs of the sampled
    tokens; mask 1 on response tokens; padding values are ignored, whatever they are).
    advantages: `[B]` per sequence or `[B, T]` per token (not gspo, gmpo).
    variant: a name in POLICY_LOSSES; clip_low / clip_high default to its paper's (None: unset), and a
    loss without a clip range (sapo, kl_cov) refuses them. params: the hyperparameters of single losses
    (LossParams: the papers' defaults when None).
    token_selection: `[B, T]` tokens singled out by a covariance loss (clip_cov, kl_cov) over the global
    batch (`select_tokens`); without it they are selected from this batch alone, with its own log-probs.
    loss_agg: a name in LOSS_AGGREGATIONS; `normalizer` replaces the batch's own count (total
    response tokens / number of sequences / number of sequences * max_response_length), so that
    micro-batches of a global batch add up to the global loss (see `loss_normalizer`).
    KL to the reference (Seed GRPO: ... - beta * D_KL(pi_theta || pi_ref)) is estimated per token
    with `kl_estimator` and aggregated like the policy loss; `kl_coef=0` disables it.
    is_weights: optional `[B, T]` rollout-correction weights (rollout_correction.py); they multiply the
    per-token policy-gradient loss, detached, and not the KL term (a regulariser towards pi_ref, not an
    expectation under the rollout policy); tokens the correction drops must also be 0 in response_mask.

    Metrics: clip_frac_tokens, clip_frac_seqs, clip_frac_low, clip_frac_high, ratio_mean,
    ratio_min, ratio_max (token ratio for grpo, sequence ratio s_i for gspo*), approx_kl_old (k3 of
    KL(pi_old || pi)), pg_loss, kl_loss (unscaled), kl_ref (when ref_logprobs given), entropy
    (when given).
    """
    loss_spec = POLICY_LOSSES.get(variant)
    LOSS_AGGREGATIONS.get(loss_agg)  # unknown names fail here, even where they would go unused
    KL_ESTIMATORS.get(kl_estimator)
    clip = resolve_clip(variant, clip_low, clip_high, dual_clip_c)
    params = LossParams() if params is None else params
    params.check()
    _check_inputs(logprobs, old_logprobs, advantages, response_mask, ref_logprobs, entropy, token_selection, kl_coef)

    # Zero every input on padding, so that whatever sits there (even NaN) reaches neither loss nor gradient.
    mask = response_mask.bool()
    logprobs = logprobs.masked_fill(~mask, 0.0)
    old_logprobs = old_logprobs.masked_fill(~mask, 0.0)
    advantages = advantages.masked_fill(~(mask if advantages.dim() == 2 else mask.any(-1)), 0.0)
    if token_selection is not None:
        token_selection = token_selection.bool() & mask
    elif loss_spec.needs_selection:
        token_selection = select_tokens(variant, logprobs.detach(), advantages, mask, params)
    surrogate = loss_spec.surrogate(logprobs, old_logprobs, advantages, mask, clip, params, token_selection)
    aggregate = partial(aggregate_loss, response_mask=mask, loss_agg=loss_agg, normalizer=normalizer,
                        max_response_length=max_response_length)
    token_loss = surrogate.token_loss
    if is_weights is not None:
        if is_weights.shape != logprobs.shape:
            raise ValueError(f"is_weights must have the shape of logprobs {tuple(logprobs.shape)}, "
                             f"got {tuple(is_weights.shape)}")
        token_loss = token_loss * is_weights.detach().masked_fill(~mask, 0.0)
    pg_loss = aggregate(token_loss)

    metrics = _metrics(surrogate, logprobs, old_logprobs, mask, entropy)
    metrics.update(surrogate.extra_metrics)
    metrics["pg_loss"] = pg_loss.detach()
    loss = pg_loss
    kl_loss = torch.zeros_like(pg_loss)
    if ref_logprobs is not None:
        token_kl = estimate_kl(logprobs, ref_logprobs.masked_fill(~mask, 0.0), kl_estimator)
        metrics["kl_ref"] = _masked_mean(token_kl.detach(), mask)
        if kl_coef != 0:
            kl_loss = aggregate(token_kl)
            loss = pg_loss + kl_coef * kl_loss
    metrics["kl_loss"] = kl_loss.detach()
    return loss, metrics
