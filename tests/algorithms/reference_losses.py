"""Loop references of the newer policy losses, written from their papers' formulas one scalar at a time
(Python loops over sequences and tokens, `math`-style scalar expressions, no masking tricks)."""
from __future__ import annotations

import math

import torch

from tests.algorithms.reference import _surrogate, kl_term


def _sigmoid(x: torch.Tensor) -> torch.Tensor:
    return 1 / (1 + torch.exp(-x))


def _binary_kl(q: float, p: float) -> float:
    """KL(Bern(q) || Bern(p))."""
    if p >= 1.0:
        return math.inf
    return q * math.log(q / p) + ((1 - q) * math.log((1 - q) / (1 - p)) if q < 1 else 0.0)


def token_loss(variant, logp, old, a, clip, params, selected):
    """-J of one token (gmpo is per sequence, see `policy_loss`)."""
    r = torch.exp(logp - old)
    if variant == "cispo":  # sg(clip(r, 1 - eps_low, 1 + eps_high)) A log pi
        return -torch.clamp(r, 1 - clip[0], 1 + clip[1]).detach() * a * logp
    if variant == "sapo":  # 4/tau sigmoid(tau (r - 1)) A
        tau = params.sapo_tau_pos if a > 0 else params.sapo_tau_neg
        return -(4 / tau) * _sigmoid(tau * (r - 1)) * a
    if variant in ("dppo_tv", "dppo_kl"):  # M r A, M = 0 outside the trust region in the update's direction
        p, q = math.exp(logp.item()), math.exp(old.item())
        if variant == "dppo_tv":
            masked = (a > 0 and p - q > clip[1]) or (a < 0 and p - q < -clip[0])
        else:
            kl = _binary_kl(q, p)
            masked = (a > 0 and p > q and kl > clip[1]) or (a < 0 and p < q and kl > clip[0])
        return -(0.0 if masked else 1.0) * r * a
    if variant == "clip_cov":  # PPO clip, gradient detached (loss 0) on the selected tokens
        return 0.0 * r if selected else _surrogate(r, a, clip[0], clip[1], None)
    if variant == "kl_cov":  # r A - beta |log r| on the selected tokens
        return -r * a + (params.kl_cov_coef * torch.abs(logp - old) if selected else 0.0)
    raise ValueError(variant)


def gmpo_sequence_loss(logps, olds, a, clip):
    """-(prod_t |min(r_t A, clip(r_t, e^-eps_low, e^eps_high) A)|)^(1/|o|) sgn(A)."""
    if a == 0:
        return 0.0 * logps[0]
    product = 1.0
    for logp, old in zip(logps, olds):
        r = torch.exp(logp - old)
        product = product * torch.abs(min(r * a, torch.clamp(r, math.exp(-clip[0]), math.exp(clip[1])) * a))
    return -product ** (1 / len(logps)) * (1.0 if a > 0 else -1.0)


def policy_loss(logp, old, adv, mask, variant, clip, params, loss_agg, selection=None, ref=None, kl_coef=0.0,
                max_len=None):
    sequences = []
    for i in range(logp.shape[0]):
        positions = [t for t in range(logp.shape[1]) if mask[i, t]]
        if not positions:
            continue
        if variant == "gmpo":
            seq = gmpo_sequence_loss([logp[i, t] for t in positions], [old[i, t] for t in positions], adv[i], clip)
            losses = [seq for _ in positions]
        else:
            losses = [token_loss(variant, logp[i, t], old[i, t], adv[i] if adv.dim() == 1 else adv[i, t], clip, params,
                                 bool(selection[i, t]) if selection is not None else False) for t in positions]
        if kl_coef:
            losses = [loss + kl_coef * kl_term(logp[i, t], ref[i, t], "k3") for loss, t in zip(losses, positions)]
        sequences.append(losses)
    if not sequences:
        return torch.zeros((), dtype=logp.dtype)
    if loss_agg == "token_mean":
        return sum(sum(seq) for seq in sequences) / sum(len(seq) for seq in sequences)
    if loss_agg == "seq_mean_token_mean":
        return sum(sum(seq) / len(seq) for seq in sequences) / len(sequences)
    return sum(sum(seq) / max_len for seq in sequences) / len(sequences)


def covariances(logp, adv, mask) -> dict[tuple[int, int], float]:
    """Cov(y_t) = (log pi(y_t) - mean log pi)(A_t - mean A) over the loss tokens, by position."""
    tokens = [(i, t) for i in range(logp.shape[0]) for t in range(logp.shape[1]) if mask[i, t]]
    advantage = {(i, t): float(adv[i] if adv.dim() == 1 else adv[i, t]) for i, t in tokens}
    mean_logp = sum(float(logp[i, t]) for i, t in tokens) / len(tokens)
    mean_adv = sum(advantage.values()) / len(tokens)
    return {(i, t): (float(logp[i, t]) - mean_logp) * (advantage[i, t] - mean_adv) for i, t in tokens}
