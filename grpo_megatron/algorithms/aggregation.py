"""How per-token losses become one scalar (`loss_agg`), with a normaliser that can come from outside.

Every mode is `(sum of terms over this batch) / normaliser`, and every normaliser is a count, so
both are additive over micro-batches and data-parallel ranks: with the normaliser of the whole
global batch (`loss_normalizer` summed over all micro-batches and ranks), the micro-batch losses
add up to the loss of the global batch. Rows without response tokens count for nothing.

  token_mean               (DAPO)      1/sum_i|o_i| * sum_i sum_t l_it
                                       normaliser = total response tokens
  seq_mean_token_mean      (GRPO)      1/G * sum_i 1/|o_i| * sum_t l_it
                                       normaliser = number of sequences
  seq_mean_token_sum_norm  (Dr. GRPO)  1/G * sum_i 1/L_max * sum_t l_it
                                       normaliser = number of sequences * L_max (a constant)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from grpo_megatron.algorithms.registry import LOSS_AGGREGATIONS


@dataclass(frozen=True)
class LossAggregation:
    """`terms(token_loss, mask)` sums what is averaged; `count(mask, max_len)` is its normaliser."""

    terms: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    count: Callable[[torch.Tensor, int | None], torch.Tensor]


def _token_sum(token_loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (token_loss * mask).sum()


def _sum_of_sequence_means(token_loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return ((token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum()


def _num_tokens(mask: torch.Tensor, max_response_length: int | None) -> torch.Tensor:
    return mask.sum()


def _num_sequences(mask: torch.Tensor, max_response_length: int | None) -> torch.Tensor:
    return (mask.sum(-1) > 0).sum()


def _num_sequences_times_max_length(mask: torch.Tensor, max_response_length: int | None) -> torch.Tensor:
    if max_response_length is None or max_response_length < 1:
        raise ValueError(
            "loss_agg 'seq_mean_token_sum_norm' needs max_response_length >= 1 (or an explicit normalizer), "
            f"got {max_response_length}"
        )
    return _num_sequences(mask, None) * max_response_length


LOSS_AGGREGATIONS.add("token_mean", LossAggregation(_token_sum, _num_tokens))
LOSS_AGGREGATIONS.add("seq_mean_token_mean", LossAggregation(_sum_of_sequence_means, _num_sequences))
LOSS_AGGREGATIONS.add("seq_mean_token_sum_norm", LossAggregation(_token_sum, _num_sequences_times_max_length))


def loss_normalizer(response_mask: torch.Tensor, loss_agg: str, max_response_length: int | None = None) -> float:
    """Normaliser of `loss_agg` for a batch; compute it over the global batch and pass it to every
    micro-batch's `compute_policy_loss(normalizer=...)` (it is a count: sum it over DP ranks).

    The micro-batch losses then sum to the global loss; where the data-parallel gradient
    reduction averages over ranks instead of summing, scale the loss by the DP size.
    """
    return float(LOSS_AGGREGATIONS.get(loss_agg).count(response_mask, max_response_length))


def aggregate_loss(
    token_loss: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg: str,
    normalizer: float | torch.Tensor | None = None,
    max_response_length: int | None = None,
) -> torch.Tensor:
    """Reduce a `[B, T]` per-token loss to a scalar with `loss_agg` (see the module docstring).

    Without `normalizer` the batch's own count is used (at least 1, so an all-padding batch gives 0).
    """
    aggregation = LOSS_AGGREGATIONS.get(loss_agg)
    mask = response_mask.to(token_loss.dtype)
    if normalizer is None:
        normalizer = aggregation.count(mask, max_response_length).clamp(min=1).to(token_loss.dtype)
    elif isinstance(normalizer, torch.Tensor):
        normalizer = normalizer.to(token_loss.dtype)  # not checked: reading it would sync the device
    elif normalizer <= 0:
        raise ValueError(f"normalizer must be > 0, got {normalizer}")
    return aggregation.terms(token_loss, mask) / normalizer
