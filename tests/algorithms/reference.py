"""Straightforward references written from the seed formulas: Python loops over groups, sequences
and tokens, one scalar at a time, no masking or broadcasting tricks."""
from __future__ import annotations

import math

import torch


def group_advantages(rewards: list[float], group_size: int, normalize_std: bool, eps: float) -> list[float]:
    """A_i = (r_i - mean) / (sqrt(1/G sum_j (r_j - mean)^2) + eps); 0 for a constant group."""
    out = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start:start + group_size]
        mean = sum(group) / len(group)
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / len(group))
        for r in group:
            if max(group) == min(group):
                out.append(0.0)
            elif normalize_std:
                out.append((r - mean) / (std + eps))
            else:
                out.append(r - mean)
    return out


def kl_term(logp: torch.Tensor, ref: torch.Tensor, estimator: str) -> torch.Tensor:
    """Schulman's estimators of KL(pi || pi_ref) with log r = ref - logp."""
    log_r = ref - logp
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r ** 2
    return torch.exp(log_r) - log_r - 1


def _surrogate(w: torch.Tensor, adv: torch.Tensor, clip_low: float, clip_high: float, dual_c: float | None):
    objective = min(w * adv, torch.clamp(w, 1 - clip_low, 1 + clip_high) * adv)
    if dual_c is not None and adv < 0:
        objective = max(objective, dual_c * adv)
    return -objective


def policy_loss(
    logp: torch.Tensor,
    old: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    variant: str,
    clip_low: float,
    clip_high: float,
    loss_agg: str,
    ref: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    dual_c: float | None = None,
    max_len: int | None = None,
) -> torch.Tensor:
    """Loss of one batch from the seed formulas (GRPO per-token ratio, GSPO sequence ratio s_i,
    GSPO-token sg[s_i] * pi / sg[pi]), aggregated token_mean / seq_mean_token_mean / seq_mean_token_sum_norm."""
    sequences = []  # per non-empty sequence: list of per-token losses
    for i in range(logp.shape[0]):
        positions = [t for t in range(logp.shape[1]) if mask[i, t]]
        if not positions:
            continue
        log_s = sum(logp[i, t] - old[i, t] for t in positions) / len(positions)
        s_i = torch.exp(log_s)
        if variant == "gspo":
            # min(s_i A_i, clip(s_i) A_i) once per sequence, shared by its tokens
            seq_loss = _surrogate(s_i, adv[i], clip_low, clip_high, dual_c)
        token_losses = []
        for t in positions:
            a = adv[i] if adv.dim() == 1 else adv[i, t]
            if variant == "grpo":
                loss = _surrogate(torch.exp(logp[i, t] - old[i, t]), a, clip_low, clip_high, dual_c)
            elif variant == "gspo":
                loss = seq_loss
            else:  # gspo_token
                s_it = s_i.detach() * torch.exp(logp[i, t] - logp[i, t].detach())
                loss = _surrogate(s_it, a, clip_low, clip_high, dual_c)
            if kl_coef:
                loss = loss + kl_coef * kl_term(logp[i, t], ref[i, t], kl_estimator)
            token_losses.append(loss)
        sequences.append(token_losses)
    if not sequences:
        return torch.zeros((), dtype=logp.dtype)
    if loss_agg == "token_mean":
        return sum(sum(seq) for seq in sequences) / sum(len(seq) for seq in sequences)
    if loss_agg == "seq_mean_token_mean":
        return sum(sum(seq) / len(seq) for seq in sequences) / len(sequences)
    return sum(sum(seq) / max_len for seq in sequences) / len(sequences)


def logprobs_and_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
    """Naive full-softmax log p(target) and entropy -sum p log p."""
    log_p = torch.log_softmax(logits.double() / temperature, dim=-1)
    return log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(log_p.exp() * log_p).sum(-1)
