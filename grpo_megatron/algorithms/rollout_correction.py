"""Train-inference mismatch correction: importance weights between the trainer's old policy and the
rollout engine's policy, truncated (TIS), masked (MIS) or used for rejection only.

The engine samples y ~ pi_rollout, but PPO's ratio pi_theta / pi_old assumes y ~ pi_old. bf16 vs fp32,
different kernels and MoE routing flips make the two differ, so the policy-gradient term is reweighted by

    rho_t = pi_old(y_t) / pi_rollout(y_t) = exp(old_t - rollout_t)                       (detached)

at one of three levels (the "unit" a weight belongs to):

  token      w_t = rho_t                                   one weight per response token
  sequence   w_i = prod_t rho_t = exp(sum_t log rho_t)     one per sequence, on all its tokens
  geometric  w_i = exp(1/|y_i| sum_t log rho_t)            one per sequence (per-token-average drift)

and a mode (registry ROLLOUT_CORRECTIONS) turns the unit weights into (weights, keep):

  tis      w -> min(w, high)                               truncated IS (slime --use-tis, verl, NeMo-RL)
  mis      w if low <= w <= high, else the unit is dropped masked IS (slime MIS "mask", icepop)
  reject   1 if low <= w <= high, else the unit is dropped rejection only (verl RS, TRL sequence mask)

On top of any mode, whole sequences are rejected when a token's rho is below `veto` (a token the trainer
finds near-impossible) or when the sequence's mean k3 KL(rollout || old) is above `max_seq_kl`.

A dropped token has weight 0 and leaves the loss mask, so it drops out of the loss normaliser (slime PR
#657: counting it in token_mean's denominator shrinks every other token's gradient), of the KL term and of
the metrics. The weights are never differentiated: they multiply the per-token policy-gradient loss only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from grpo_megatron.algorithms.kl import MAX_LOG_RATIO, estimate_kl
from grpo_megatron.algorithms.registry import ROLLOUT_CORRECTIONS, ROLLOUT_IS_LEVELS

Mode = Callable[[torch.Tensor, float, float], tuple[torch.Tensor, torch.Tensor]]
"""(log unit weights [B, T], low, high) -> (weights [B, T], keep [B, T] bool)."""


@dataclass(frozen=True)
class Correction:
    """`weights` [B, T]: detached, 0 wherever `keep` is False (and on padding); `keep` [B, T] bool: the
    response tokens that stay in the loss; `log_unit` [B, T]: the log of the unit weight before
    truncation or masking (broadcast over a sequence for sequence levels), for metrics and the
    adaptive bound; `rejected` [B] bool: sequences the veto or the KL bound removed."""

    weights: torch.Tensor
    keep: torch.Tensor
    log_unit: torch.Tensor
    rejected: torch.Tensor


@ROLLOUT_IS_LEVELS.register("token")
def token_level(log_rho: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log rho_t itself."""
    return log_rho


@ROLLOUT_IS_LEVELS.register("sequence")
def sequence_level(log_rho: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_t log rho_t on every token of the sequence: the likelihood ratio of the whole response."""
    return (log_rho * mask).sum(-1, keepdim=True).expand_as(log_rho)


@ROLLOUT_IS_LEVELS.register("geometric")
def geometric_level(log_rho: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean_t log rho_t on every token: length-independent, so bounds stay meaningful for long responses."""
    return sequence_level(log_rho, mask) / mask.sum(-1, keepdim=True).clamp(min=1)


@ROLLOUT_CORRECTIONS.register("tis")
def truncate(log_w: torch.Tensor, low: float, high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """min(w, high): bounded variance at the price of a bias on the truncated units; nothing is dropped."""
    return _exp(log_w.clamp(max=math.log(high))), torch.ones_like(log_w, dtype=torch.bool)


@ROLLOUT_CORRECTIONS.register("mis")
def mask(log_w: torch.Tensor, low: float, high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """w inside [low, high], dropped outside: no bias from rescaling kept units, variance bounded by high."""
    keep = _inside(log_w, low, high)
    return _exp(log_w).masked_fill(~keep, 0.0), keep


@ROLLOUT_CORRECTIONS.register("reject")
def reject(log_w: torch.Tensor, low: float, high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """1 inside [low, high], dropped outside: rejection sampling without reweighting."""
    keep = _inside(log_w, low, high)
    return keep.to(log_w.dtype), keep


def _exp(log_w: torch.Tensor) -> torch.Tensor:
    return log_w.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO).exp()


def _inside(log_w: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """low <= w <= high, compared in log space so that a huge sequence product cannot overflow."""
    lower = math.log(low) if low > 0 else -math.inf
    return (log_w >= lower) & (log_w <= math.log(high))


def rejected_sequences(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor,
                       veto: float | None, max_seq_kl: float | None) -> torch.Tensor:
    """[B] bool: any token with rho_t < veto, or mean_t k3 KL(rollout || old) > max_seq_kl."""
    rejected = torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
    if veto is not None:
        rejected |= ((old_logprobs - rollout_logprobs < math.log(veto)) & mask).any(-1)
    if max_seq_kl is not None:
        k3 = estimate_kl(rollout_logprobs, old_logprobs, "k3").masked_fill(~mask, 0.0)
        rejected |= k3.sum(-1) / mask.sum(-1).clamp(min=1) > max_seq_kl
    return rejected


def compute_rollout_correction(
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    mode: str,
    level: str,
    low: float = 0.0,
    high: float = 2.0,
    veto: float | None = None,
    max_seq_kl: float | None = None,
) -> Correction:
    """Weights and keep-mask for `[B, T]` old (trainer) and rollout (engine) log-probs of the sampled tokens.

    Everything is per sequence, so the result of a row does not depend on which other rows share the
    batch (micro-batch splits cannot change it). Weights are exactly 1 where the log-probs agree.
    """
    mode_fn: Mode = ROLLOUT_CORRECTIONS.get(mode)
    level_fn = ROLLOUT_IS_LEVELS.get(level)
    m = response_mask.bool()
    old = old_logprobs.detach().masked_fill(~m, 0.0)
    rollout = rollout_logprobs.detach().masked_fill(~m, 0.0)
    log_unit = level_fn(old - rollout, m)
    weights, keep = mode_fn(log_unit, low, high)
    rejected = rejected_sequences(old, rollout, m, veto, max_seq_kl)
    keep = keep & m & ~rejected.unsqueeze(-1)
    return Correction(weights.masked_fill(~keep, 0.0), keep, log_unit.masked_fill(~m, 0.0), rejected)


def unit_values(values: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """The 1-D values of the level's units: masked tokens for `token`, one per non-empty row otherwise."""
    m = mask.bool()
    if level == "token":
        return values[m]
    rows = m.any(-1)
    first = m.to(torch.int64).argmax(-1)
    return values.gather(-1, first.unsqueeze(-1)).squeeze(-1)[rows]


def effective_sample_size(weights: torch.Tensor) -> torch.Tensor:
    """Normalised ESS (sum w)^2 / (n sum w^2) in (0, 1] of 1-D weights: 1 when all are equal, 1/n when
    one dominates (1 for an empty or all-zero set, where there is nothing to correct)."""
    if weights.numel() == 0:
        return weights.new_tensor(1.0)
    # Scale-free, so divided by the largest weight first: tiny weights' squares then neither underflow nor
    # fall under a floor (equal weights of 1e-20 have ESS 1; a clamp at 1e-30 made it 3e-10).
    w = weights / weights.abs().amax().clamp(min=torch.finfo(weights.dtype).tiny)
    square_sum = w.square().sum()
    return torch.where(square_sum > 0, w.sum().square() / (w.numel() * square_sum), 1.0)


def adaptive_truncation_bound(unit_weights: torch.Tensor, high: float, ess_target: float) -> float:
    """The largest truncation bound C in [1, high] whose truncated weights min(w, C) keep the normalised
    ESS >= ess_target; 1 if none does.

    ESS(min(w, C)) never increases with C (d log ESS / dC has the sign of sum over untruncated w_i of
    w_i (w_i - C) <= 0), so the largest passing C trades the least truncation bias for the variance the
    target allows; the smallest bound would always pass and truncate everything to 1. Candidates are
    1, `high` and the live weights in between (the breakpoints of ESS(C)): O(n log n) via prefix sums.
    """
    w = unit_weights.detach().double().flatten().sort().values
    n = w.numel()
    if n == 0:
        return float(high)
    # Candidate C = w_j (ascending): w_0..w_j stay, the n-1-j above are cut to C (ties give the same ESS).
    kept_sum, kept_square_sum = w.cumsum(0), w.square().cumsum(0)
    cut = torch.arange(n - 1, -1, -1, dtype=w.dtype)
    ess = (kept_sum + cut * w).square() / (n * (kept_square_sum + cut * w.square()).clamp(min=1e-300))
    inside = (w >= 1.0) & (w < high)
    candidates = torch.cat([w[inside], w.new_tensor([1.0, high])])
    passing = torch.cat([ess[inside], torch.stack([_truncated_ess(w, 1.0), _truncated_ess(w, high)])]) >= ess_target
    return float(candidates[passing].max()) if passing.any() else 1.0


def _truncated_ess(w: torch.Tensor, bound: float) -> torch.Tensor:
    return effective_sample_size(w.clamp(max=bound))
