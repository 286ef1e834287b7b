"""Hyperparameters of single policy losses beyond the clip range, with their papers' defaults.

Each acts only with its loss (`algorithm.loss`); the config mirrors these fields in
`algorithm.loss_params` (config.py stays free of torch, so it keeps its own copy of the defaults and a
test checks that the two agree).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LossParams:
    """SAPO: gate temperatures for positive / negative advantages (arXiv 2511.20347).
    Clip-Cov: fraction of the batch's tokens to detach, drawn from those whose covariance lies in
    (lb, ub); KL-Cov: fraction of tokens with the largest covariance that get the |log r| penalty and
    its coefficient (arXiv 2505.22617; verl's defaults, beta of the paper)."""

    sapo_tau_pos: float = 1.0
    sapo_tau_neg: float = 1.05
    clip_cov_ratio: float = 2e-4
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    kl_cov_ratio: float = 2e-4
    kl_cov_coef: float = 1.0

    def check(self) -> None:
        """One-line ValueError naming the first bad field."""
        if not (self.sapo_tau_pos > 0 and self.sapo_tau_neg > 0):
            raise ValueError(f"sapo_tau_pos and sapo_tau_neg must be > 0 (paper: 1.0 and 1.05), got "
                             f"{self.sapo_tau_pos} and {self.sapo_tau_neg}")
        for name in ("clip_cov_ratio", "kl_cov_ratio"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1] (a fraction of the batch's tokens, e.g. 2e-4), "
                                 f"got {getattr(self, name)}")
        if not self.clip_cov_lb < self.clip_cov_ub:
            raise ValueError(f"clip_cov_lb must be below clip_cov_ub (paper: 1 and 5), got {self.clip_cov_lb} "
                             f"and {self.clip_cov_ub}")
        if not self.kl_cov_coef >= 0:
            raise ValueError(f"kl_cov_coef must be >= 0 (paper: 1), got {self.kl_cov_coef}")
