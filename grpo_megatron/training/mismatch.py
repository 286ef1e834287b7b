"""How far the trainer's log-probs are from the rollout engine's for the same tokens and weights."""
from __future__ import annotations

import math

import torch

from grpo_megatron.algorithms import MAX_LOG_RATIO, Correction, effective_sample_size, estimate_kl
from grpo_megatron.algorithms.rollout_correction import unit_values

_RATIO_BOUND = math.log(2.0)


def train_rollout_mismatch(train_logprobs: torch.Tensor, engine_logprobs: torch.Tensor,
                           mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean |log p_train - log p_rollout|, k3 KL(rollout || train), and the fraction of tokens whose
    probability ratio train/rollout lies outside [1/2, 2], over the response tokens in `mask`."""
    m = mask.bool()
    count = m.sum().clamp(min=1)
    diff = (train_logprobs - engine_logprobs).masked_fill(~m, 0.0)
    k3 = estimate_kl(engine_logprobs.masked_fill(~m, 0.0), train_logprobs.masked_fill(~m, 0.0), "k3")
    return {
        "train_rollout/logprob_abs_diff": diff.abs().sum() / count,
        "train_rollout/k3_kl": (k3 * m).sum() / count,
        "train_rollout/ratio_outside_2x": ((diff.abs() > _RATIO_BOUND) & m).sum() / count,
    }


def rollout_correction_metrics(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor,
                               correction: Correction | None = None, level: str = "token",
                               bound: float | None = None) -> dict[str, float]:
    """Divergence of the trainer's old policy from the rollout policy over a whole step's `[B, T]` response
    tokens, and what the correction did with it (when `correction` is given; `bound` is its truncation bound).

    rho_t = pi_old / pi_rollout. chi2_token = mean_t rho_t^2 - 1 and chi2_seq = mean_i (prod_t rho_t)^2 - 1
    (the variance of the IS weights: 0 when the policies agree); log_ppl_diff = mean_i (log PPL_old -
    log PPL_rollout) and ppl_ratio = mean_i PPL_old / PPL_rollout per sequence; ess_raw and ess: normalised
    ESS (sum w)^2 / (n sum w^2) of the `level` unit weights before and after the correction; frac_truncated
    / frac_masked: response tokens whose weight was cut / dropped by the mode; frac_rejected: sequences the
    veto or max_seq_kl removed; weight_min/mean/max over the tokens left in the loss.
    """
    m = mask.bool()
    rows = m.any(-1)
    log_rho = (old_logprobs - rollout_logprobs).masked_fill(~m, 0.0).double()
    lengths = m.sum(-1).clamp(min=1)
    seq_log_rho = log_rho.sum(-1)[rows]
    mean_log_rho = (log_rho.sum(-1) / lengths)[rows]
    log_unit = log_rho if correction is None else correction.log_unit.double()
    metrics = {
        "chi2_token": _exp(2 * log_rho)[m].mean() - 1 if m.any() else log_rho.new_tensor(0.0),
        "chi2_seq": _exp(2 * seq_log_rho).mean() - 1 if rows.any() else log_rho.new_tensor(0.0),
        "log_ppl_diff": -mean_log_rho.mean() if rows.any() else log_rho.new_tensor(0.0),
        "ppl_ratio": _exp(-mean_log_rho).mean() if rows.any() else log_rho.new_tensor(1.0),
        "ess_raw": effective_sample_size(_exp(unit_values(log_unit, m, level))),
    }
    if correction is not None:
        count = m.sum().clamp(min=1)
        weights = correction.weights.double()
        keep = correction.keep & m
        dropped_by_mode = m & ~keep & ~correction.rejected.unsqueeze(-1)
        kept_weights = weights[keep]
        metrics.update({
            "ess": effective_sample_size(unit_values(weights, keep, level)),
            "frac_truncated": ((log_unit > math.log(bound)) & keep).sum() / count if bound else log_rho.new_tensor(0.0),
            "frac_masked": dropped_by_mode.sum() / count,
            "frac_rejected": (correction.rejected & rows).sum() / rows.sum().clamp(min=1),
            "weight_min": kept_weights.min() if kept_weights.numel() else log_rho.new_tensor(0.0),
            "weight_mean": kept_weights.mean() if kept_weights.numel() else log_rho.new_tensor(0.0),
            "weight_max": kept_weights.max() if kept_weights.numel() else log_rho.new_tensor(0.0),
        })
        if bound is not None:
            metrics["bound"] = log_rho.new_tensor(bound)
    return {f"rollout_correction/{k}": float(v) for k, v in metrics.items()}


def _exp(log_w: torch.Tensor) -> torch.Tensor:
    return log_w.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO).exp()
