"""Sampled-evaluation estimators: avg@k and the unbiased pass@k of Chen et al. (2021, Codex)."""
from __future__ import annotations

import math


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Probability that at least one of k responses drawn without replacement from `num_samples`
    (of which `num_correct` are correct) is correct: 1 - C(n - c, k) / C(n, k).

    Unbiased for pass@k of the policy, unlike 1 - (1 - c/n)^k; needs k <= n.
    """
    if not 1 <= k <= num_samples:
        raise ValueError(f"pass@k needs 1 <= k <= num_samples, got k={k}, num_samples={num_samples}")
    if not 0 <= num_correct <= num_samples:
        raise ValueError(f"num_correct={num_correct} must be in [0, num_samples={num_samples}]")
    if num_samples - num_correct < k:
        return 1.0
    # prod_{i=n-c+1}^{n} (1 - k / i): the ratio of binomials without big integers.
    return 1.0 - math.prod(1.0 - k / i for i in range(num_samples - num_correct + 1, num_samples + 1))
