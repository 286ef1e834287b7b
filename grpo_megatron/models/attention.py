"""Core attention through torch's fused `scaled_dot_product_attention`, for megatron's local layer spec.

Without TransformerEngine, megatron-core's `DotProductAttention` materialises the [b, heads, s, s] score
matrix (baddbmm, masked softmax, bmm) and repeats the KV heads for GQA; on CPU that is several times
slower than torch's flash-attention kernel and most of the update's non-matmul time. This module keeps
megatron's constructor (scale, heads per TP partition, checkpoint format) and computes the causal,
mask-free case the trainer uses with SDPA; every other case (explicit masks, packed sequences, attention
bias, dropout, windowed or off-by-one softmax, query-key layer scaling, sq != sk) runs megatron's own code.
The TransformerEngine spec is never touched.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SdpaDotProductAttention(DotProductAttention):
    """megatron's DotProductAttention with the causal, unmasked path on `F.scaled_dot_product_attention`."""

    def _sdpa_applies(self, query, key, attention_mask, attention_bias, packed_seq_params) -> bool:
        config = self.config
        return (
            attention_mask is None
            and attention_bias is None
            and packed_seq_params is None
            and self.attn_mask_type == AttnMaskType.causal
            and query.size(0) == key.size(0)
            and self.softmax_offset is None
            and not config.apply_query_key_layer_scaling
            and config.window_size is None
            and not (self.training and self.attention_dropout.p > 0)
        )

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """query [sq, b, heads, d], key/value [sk, b, groups, d] -> context [sq, b, heads * d]."""
        if not self._sdpa_applies(query, key, attention_mask, attention_bias, packed_seq_params):
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias, packed_seq_params=packed_seq_params)
        sq, batch = query.size(0), query.size(1)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        context = F.scaled_dot_product_attention(
            q, k, v, is_causal=sq > 1, scale=self.softmax_scale, enable_gqa=k.size(1) != q.size(1))
        return context.permute(2, 0, 1, 3).reshape(sq, batch, self.hidden_size_per_partition)


def use_sdpa_core_attention(block_spec) -> None:
    """Replace megatron's local `DotProductAttention` with `SdpaDotProductAttention` in a decoder block spec."""
    for layer_spec in getattr(block_spec, "layer_specs", None) or [block_spec]:
        attention = getattr(layer_spec.submodules, "self_attention", None)
        submodules = getattr(attention, "submodules", None)
        if getattr(submodules, "core_attention", None) is DotProductAttention:
            submodules.core_attention = SdpaDotProductAttention
