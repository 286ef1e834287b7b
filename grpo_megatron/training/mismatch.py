"""How far the trainer's log-probs are from the rollout engine's for the same tokens and weights."""
from __future__ import annotations

import math

import torch

from grpo_megatron.algorithms import estimate_kl

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
