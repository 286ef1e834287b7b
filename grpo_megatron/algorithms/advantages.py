"""Group-relative advantages: the group mean replaces a learned critic.

Seed formula (GRPO / GSPO, population std over the group of G samples of one prompt):

    A_i = (r(x, y_i) - mean_j r(x, y_j)) / sqrt(1/G * sum_j (r(x, y_j) - mean)^2)

Dr. GRPO drops the std division (it re-weights prompts by their difficulty): A_i = r_i - mean.
"""
from __future__ import annotations

import torch

from grpo_megatron.algorithms.registry import ADVANTAGE_ESTIMATORS


def compute_group_advantages(
    rewards: torch.Tensor, group_size: int, normalize_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Advantages for a flat `[num_prompts * group_size]` reward tensor grouped consecutively.

    Returns `(r - group_mean) / (group_std + eps)` (or `r - group_mean` when `normalize_std` is
    False). A group whose rewards are all equal carries no learning signal and gets exactly 0
    (never NaN, whatever `eps`): rounding in the mean would otherwise leave tiny non-zero values.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be a flat [num_prompts * group_size] tensor, got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"{rewards.numel()} rewards cannot be split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if normalize_std:
        centred = centred / (grouped.std(dim=1, unbiased=False, keepdim=True) + eps)
    constant_group = (grouped.amax(dim=1) == grouped.amin(dim=1)).unsqueeze(1)
    return torch.where(constant_group, torch.zeros_like(centred), centred).view_as(rewards)


@ADVANTAGE_ESTIMATORS.register("grpo")
def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO / GSPO / DAPO: mean-centred and std-normalised within the group."""
    return compute_group_advantages(rewards, group_size, normalize_std=True, eps=eps)


@ADVANTAGE_ESTIMATORS.register("dr_grpo")
def dr_grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """Dr. GRPO: mean-centred only (`eps` unused, kept so every estimator has one signature)."""
    return compute_group_advantages(rewards, group_size, normalize_std=False, eps=eps)
