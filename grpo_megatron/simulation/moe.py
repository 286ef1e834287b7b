"""MoE token dispatch with sizes fake mode can know: a balanced-routing stand-in, or capacity-padded dispatch.

Megatron's dropless all-to-all dispatcher sizes its buffers from data: per-expert token counts copied to host
numpy (`token_dispatcher.py` `MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize`, through
`moe_utils.maybe_move_tensor_to_cpu`) and `masked_select` in `moe_utils.permute`/`unpermute`. Fake tensors have
no values, so:

* `balanced(skew)`: the dispatcher's `preprocess` hands out host counts as if the router spread the
  `tokens x topk` assignments evenly over the experts, and each rank *receives* `skew` times its even share
  (real routing is never perfectly balanced: the project trains with `moe_aux_loss_coeff = 0`); permute and
  unpermute take static-size stand-ins for their `masked_select`s. Everything else (router, all-to-alls, the
  experts' loop, combine) is megatron's own code at those sizes.
* capacity-padded dispatch is megatron's own (`moe_expert_capacity_factor` + `moe_pad_expert_input_to_capacity`,
  see `capacity_overrides`): static sizes by construction, at the price of dropped or padded tokens.
"""
from __future__ import annotations

import inspect

import math

import numpy as np
import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

_STATE = {"skew": 1.0}
_ORIGINAL: dict = {}


def capacity_overrides(capacity_factor: float) -> dict:
    """TransformerConfig overrides for megatron's capacity-padded (token-dropping) dispatch."""
    return dict(moe_expert_capacity_factor=capacity_factor, moe_pad_expert_input_to_capacity=True,
                moe_token_drop_policy="probs")


def _balanced_preprocess(self, routing_map: torch.Tensor) -> torch.Tensor:
    """`MoEAlltoAllTokenDispatcher.preprocess` with balanced host counts (see the module docstring)."""
    if self.drop_and_pad:  # capacity-padded: static sizes, but the counts it makes on the host became fake
        _ORIGINAL["preprocess"](self, routing_map)
        with unset_fake_temporarily():
            return torch.full((self.num_local_experts,), self.capacity * self.tp_size * self.ep_size, dtype=torch.long)
    assignments = routing_map.size(0) * self.config.moe_router_topk
    self.num_out_tokens = assignments
    sources = self.tp_size * self.ep_size
    per_source_expert = math.ceil(assignments / self.num_experts * _STATE["skew"])
    local = self.num_local_experts
    counts = np.full((sources, local), per_source_expert, dtype=np.int64)  # host values, as after the D2H copy
    if self.ep_size > 1 or self.tp_size > 1:
        base, extra = divmod(assignments, self.ep_size)
        self.input_splits = np.array([base + (i < extra) for i in range(self.ep_size)], dtype=np.int64)
        per_rank = counts.reshape(self.tp_size, self.ep_size, local).sum(axis=2)
        self.output_splits = per_rank[self.tp_rank]
        self.output_splits_tp = per_rank.sum(axis=1)
        self._maybe_update_cuda_sync_point("before_ep_alltoall")
    else:
        self._maybe_update_cuda_sync_point("before_finish")
    with unset_fake_temporarily():
        if local > 1:
            self.num_global_tokens_per_local_expert = torch.from_numpy(counts)
            self._maybe_update_cuda_sync_point("before_permutation_2")
        return torch.from_numpy(counts.sum(axis=0))


def _static_masked_select(values: torch.Tensor, mask: torch.Tensor, count: int) -> torch.Tensor:
    """`values.masked_select(mask)` for a mask known to hold `count` true entries (sizes only)."""
    return values.reshape(-1).narrow(0, 0, count).clone()


def _balanced_permute(tokens, routing_map, probs=None, num_out_tokens=None, fused=False, drop_and_pad=False,
                      **newer):
    """`moe_utils.permute` with the dropless branch's sizes from `num_out_tokens` (tokens x topk). megatron-core
    0.19 added `tokens_per_expert`/`align_size` (`newer`) and returns (…, pad_offsets, tokens_per_expert)."""
    if drop_and_pad or fused or num_out_tokens is None:
        return _ORIGINAL["permute"](tokens, routing_map, probs, num_out_tokens, fused, drop_and_pad, **newer)
    num_tokens = tokens.size(0)
    token_indices = torch.arange(num_tokens, device=routing_map.device).unsqueeze(0).expand(routing_map.size(1), -1)
    sorted_indices = _static_masked_select(token_indices, routing_map, num_out_tokens)
    permuted_probs = None
    if probs is not None:
        permuted_probs = _static_masked_select(probs.T.contiguous(), routing_map, num_out_tokens)
    permuted = (tokens.index_select(0, sorted_indices), permuted_probs, sorted_indices)
    if "tokens_per_expert" in inspect.signature(_ORIGINAL["permute"]).parameters:  # megatron-core >= 0.19
        return (*permuted, None, newer.get("tokens_per_expert"))
    return permuted


def _balanced_unpermute(permuted_tokens, sorted_indices, restore_shape, probs=None, routing_map=None, fused=False,
                        drop_and_pad=False, **newer):
    """`moe_utils.unpermute` with the dropless branch's probability gather at static size."""
    if probs is None or drop_and_pad or fused:
        return _ORIGINAL["unpermute"](permuted_tokens, sorted_indices, restore_shape, probs, routing_map, fused,
                                      drop_and_pad, **newer)
    permuted_probs = _static_masked_select(probs.T.contiguous(), routing_map, sorted_indices.size(0))
    weighted = permuted_tokens * permuted_probs.unsqueeze(-1)
    return _ORIGINAL["unpermute"](weighted, sorted_indices, restore_shape, None, None, False, False)


def _balanced_sort_chunks(input, split_sizes, sorted_idxs, probs=None, fused=False):
    """`moe_utils.sort_chunks_by_idxs` for the stand-in's equal chunks (its host sizes became fake values)."""
    if fused:
        return _ORIGINAL["sort_chunks"](input, split_sizes, sorted_idxs, probs, fused)
    chunks = split_sizes.numel()
    output = torch.cat(list(reversed(torch.split(input, input.size(0) // chunks, dim=0))), dim=0)
    if probs is not None:
        probs = torch.cat(list(reversed(torch.split(probs, probs.size(0) // chunks, dim=0))), dim=0)
    return output, probs


def use_balanced_dispatch(skew: float = 1.0) -> None:
    """Install the balanced-routing stand-in (idempotent); each rank receives `skew` x its even share. Needed for
    capacity-padded dispatch too (its per-expert counts are made on the host, which fake mode would fake)."""
    from megatron.core.transformer.moe import token_dispatcher

    if skew < 1.0:
        raise ValueError(f"routing skew {skew} < 1: a rank receives at least its even share; use >= 1")
    _STATE["skew"] = skew
    dispatcher = token_dispatcher.MoEAlltoAllTokenDispatcher
    if "preprocess" not in _ORIGINAL:
        _ORIGINAL.update(preprocess=dispatcher.preprocess, permute=token_dispatcher.permute,
                         unpermute=token_dispatcher.unpermute, sort_chunks=token_dispatcher.sort_chunks_by_idxs)
        token_dispatcher.sort_chunks_by_idxs = _balanced_sort_chunks
        dispatcher.preprocess = _balanced_preprocess
        token_dispatcher.permute = _balanced_permute
        token_dispatcher.unpermute = _balanced_unpermute
