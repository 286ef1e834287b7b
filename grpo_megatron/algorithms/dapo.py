"""DAPO's data-side pieces: dynamic sampling, overlong reward shaping, overlong filtering.

(Clip-higher and token-level loss normalisation live in policy_loss.py / aggregation.py.)
"""
from __future__ import annotations

import torch


def dynamic_sampling_keep(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Boolean `[num_prompts]`: which groups to keep (rewards grouped consecutively).

    Seed (DAPO): keep a prompt only if 0 < |{o_i : correct(o_i)}| < G. In general: keep groups
    whose reward std is > 0, i.e. whose rewards are not all equal; the others have zero
    advantages and so no gradient.
    """
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards of shape {tuple(rewards.shape)} cannot be split into groups of {group_size}"
        )
    grouped = rewards.view(-1, group_size)
    return grouped.amax(dim=1) > grouped.amin(dim=1)


def overlong_reward_penalty(response_lengths: torch.Tensor, max_length: int, cache_length: int) -> torch.Tensor:
    """DAPO soft overlong punishment, added to the task reward (L_max = max_length, L_cache = cache_length):

        R_length(y) = 0                                 if |y| <= L_max - L_cache
                    = ((L_max - L_cache) - |y|) / L_cache   if L_max - L_cache < |y| <= L_max
                    = -1                                if |y| > L_max
    """
    if not 0 < cache_length <= max_length:
        raise ValueError(f"need 0 < cache_length <= max_length, got cache_length={cache_length}, max_length={max_length}")
    lengths = response_lengths.to(torch.float64)
    excess = lengths - (max_length - cache_length)
    penalty = (-excess / cache_length).clamp(min=-1.0, max=0.0)
    return penalty.to(torch.get_default_dtype())


def overlong_filter_mask(response_mask: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """Overlong filtering: the response mask with truncated samples (`truncated`: bool `[B]`)
    masked out of the loss, since their reward is for an unfinished answer."""
    if truncated.shape != response_mask.shape[:1]:
        raise ValueError(f"truncated must be [B] = {tuple(response_mask.shape[:1])}, got {tuple(truncated.shape)}")
    return response_mask.masked_fill(truncated.bool().unsqueeze(-1), 0)
