"""Per-token KL estimators (Schulman, "Approximating KL Divergence", 2020).

With samples x ~ q and r = p(x) / q(x), each k estimates KL(q || p):

    k1 = -log r                 (unbiased, high variance, can be negative)
    k2 = 1/2 (log r)^2          (biased, low variance)
    k3 = (r - 1) - log r        (unbiased, low variance, >= 0)

For the GRPO penalty q = pi_theta and p = pi_ref, so with log r = ref - logp:
k3 = exp(ref - logp) - (ref - logp) - 1.
"""
from __future__ import annotations

import torch

from grpo_megatron.algorithms.registry import KL_ESTIMATORS

MAX_LOG_RATIO = 20.0
"""|log r| is clamped here before any exp(): exp(20) ~ 5e8 keeps float32 finite for samples
that are hopelessly off-policy (their gradient is cut, as a clip would do anyway)."""


@KL_ESTIMATORS.register("k1")
def kl_k1(log_ratio: torch.Tensor) -> torch.Tensor:
    """k1 = -log r."""
    return -log_ratio


@KL_ESTIMATORS.register("k2")
def kl_k2(log_ratio: torch.Tensor) -> torch.Tensor:
    """k2 = 1/2 (log r)^2."""
    return 0.5 * log_ratio.square()


@KL_ESTIMATORS.register("k3")
def kl_k3(log_ratio: torch.Tensor) -> torch.Tensor:
    """k3 = exp(log r) - log r - 1."""
    log_ratio = log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    return torch.expm1(log_ratio) - log_ratio


def estimate_kl(sample_logprobs: torch.Tensor, other_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(q || p) from log q and log p of tokens sampled from q.

    KL to the reference: `estimate_kl(logprobs, ref_logprobs, "k3")`.
    """
    return KL_ESTIMATORS.get(estimator)(other_logprobs - sample_logprobs)
