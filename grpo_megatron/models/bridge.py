"""HF <-> megatron-core name and layout mapping: a thin wrapper over mbridge.

mbridge (a maintained NVIDIA library) owns the per-family mapping of Hugging Face parameter names and
layouts to megatron-core's (QKV interleaving, gate/up fusion, expert naming, TP split/merge). We add
only what it gets wrong or does not cover here, each marked below:

* it always builds the TransformerEngine layer spec; on CPU we build megatron's local spec (with torch's
  fused SDPA as core attention, `models/attention.py`, and grouped-GEMM experts, `models/experts.py`) and translate the local spec's parameter names to
  the TE-style names its mapping expects;
* Mixtral and Qwen3-MoE router settings that differ from Hugging Face's routing;
* `rope_theta`, which transformers 5 moved into `rope_parameters`;
* the tied-embedding mapping, which mbridge mutates on the class (leaking into later models);
* a strict check of the HF config, so an unsupported field fails instead of converting silently.
"""
from __future__ import annotations

import re

import torch
import transformers

from grpo_megatron.errors import UserError
from grpo_megatron.parallel import ParallelLayout
from grpo_megatron.platform import detect

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "qwen3_moe", "mixtral")
MOE_MODEL_TYPES = ("qwen3_moe", "mixtral")


class UnsupportedModelError(UserError, ValueError):
    """The HF config describes something the mapping cannot reproduce exactly."""


def validate_hf_config(hf_config: transformers.PretrainedConfig) -> None:
    """Refuse configs whose semantics the megatron model would not reproduce."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"unsupported architecture {model_type!r} ({getattr(hf_config, 'architectures', None)}); "
            f"supported model_type values: {', '.join(SUPPORTED_MODEL_TYPES)}")
    problems = []
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf_config.hidden_act!r} (only 'silu' is mapped)")
    rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        problems.append(f"rope scaling {rope!r} (only default RoPE is mapped)")
    if getattr(hf_config, "use_sliding_window", False) or getattr(hf_config, "sliding_window", None):
        problems.append("sliding-window attention (set sliding_window: null to use full attention)")
    if model_type in ("llama", "qwen3", "qwen3_moe", "mixtral") and getattr(hf_config, "attention_bias", False):
        problems.append("attention_bias=True (the output projection bias is not mapped)")
    if getattr(hf_config, "mlp_bias", False):
        problems.append("mlp_bias=True (MLP biases are not mapped)")
    if model_type == "qwen3_moe":
        if getattr(hf_config, "mlp_only_layers", []):
            problems.append(f"mlp_only_layers={hf_config.mlp_only_layers} (mixed dense/MoE layers)")
        if getattr(hf_config, "decoder_sparse_step", 1) != 1:
            problems.append(f"decoder_sparse_step={hf_config.decoder_sparse_step} (mixed dense/MoE layers)")
    if getattr(hf_config, "router_jitter_noise", 0.0):
        problems.append("router_jitter_noise > 0 (training-time noise megatron does not reproduce)")
    if problems:
        raise UnsupportedModelError(
            f"{model_type} config has fields the mapping does not support: " + "; ".join(problems))


def _rope_theta(hf_config) -> float:
    theta = getattr(hf_config, "rope_theta", None)
    if theta is None:
        theta = (getattr(hf_config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(theta)


def router_settings(hf_config) -> dict:
    """Megatron router flags that reproduce Hugging Face's routing for the MoE families.

    HF Mixtral: softmax over the top-k logits (== softmax over all, top-k, renormalise) -> megatron
    pre_softmax=False (mbridge sets True, which changes logits by ~0.03). HF Qwen3-MoE: softmax over all
    experts, top-k, renormalised only when norm_topk_prob -> pre_softmax = not norm_topk_prob.
    """
    if hf_config.model_type == "mixtral":
        pre_softmax = False
    elif hf_config.model_type == "qwen3_moe":
        pre_softmax = not getattr(hf_config, "norm_topk_prob", False)
    else:
        return {}
    return dict(
        moe_router_pre_softmax=pre_softmax,
        moe_router_score_function="softmax",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_router_dtype="fp32",
        moe_token_dispatcher_type="alltoall",
    )


# local-spec name -> TE-spec name (the names mbridge's mapping tables use)
_LOCAL_TO_TE = (
    (re.compile(r"(\.layers\.\d+)\.input_layernorm\.weight$"), r"\1.self_attention.linear_qkv.layer_norm_weight"),
    (re.compile(r"(\.layers\.\d+)\.mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.weight$"),
     r"\1.mlp.experts.\3.weight\2"),
)
_DENSE_PRE_MLP_NORM = (re.compile(r"(\.layers\.\d+)\.pre_mlp_layernorm\.weight$"),
                       r"\1.mlp.linear_fc1.layer_norm_weight")
_EXPERT_NAME = re.compile(r"^(.*\.mlp\.experts\.linear_fc[12]\.weight)(\d+)$")


class _GrpoBridgeMixin:
    """Overrides applied on top of the family's mbridge class (see the module docstring)."""

    _use_te: bool = False
    _is_moe: bool = False

    def _adjust_mapping_for_shared_weights(self):
        # mbridge's Qwen2 bridge edits the class-level dict; keep an instance copy instead.
        self._DIRECT_MAPPING = dict(type(self)._DIRECT_MAPPING)
        if getattr(self.hf_config, "tie_word_embeddings", False):
            self._DIRECT_MAPPING["output_layer.weight"] = "model.embed_tokens.weight"

    def _get_hf_shared_weight_keys(self):
        return ["model.embed_tokens.weight"] if getattr(self.hf_config, "tie_word_embeddings", False) else []

    def _get_gptmodel_args(self) -> dict:
        return dict(
            vocab_size=self.hf_config.vocab_size,
            max_sequence_length=self.hf_config.max_position_embeddings,
            position_embedding_type="rope",
            rotary_base=_rope_theta(self.hf_config),
        )

    def _get_transformer_layer_spec(self, vp_stage=None):
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

        from grpo_megatron.models.attention import use_sdpa_core_attention
        from grpo_megatron.models.experts import use_grouped_mm_experts

        self.has_vp_stage = True
        spec = get_gpt_decoder_block_spec(self.config, use_transformer_engine=self._use_te, vp_stage=vp_stage)
        if not self._use_te:
            use_sdpa_core_attention(spec)
            use_grouped_mm_experts(spec)
        return spec

    def to_te_name(self, name: str) -> str:
        """A parameter name of our (possibly local-spec) model in the TE-style naming of the mapping."""
        if self._use_te:
            return name
        for pattern, repl in _LOCAL_TO_TE:
            name = pattern.sub(repl, name)
        if not self._is_moe:
            name = _DENSE_PRE_MLP_NORM[0].sub(_DENSE_PRE_MLP_NORM[1], name)
        return name

    def _weight_name_mapping_mcore_local_to_global(self, model, consider_ep: bool = True) -> dict[str, str]:
        per_layer = super()._weight_name_mapping_mcore_local_to_global(model, consider_ep=False)
        mapping = {local: self.to_te_name(global_name) for local, global_name in per_layer.items()}
        if consider_ep and self.mpu.ep_size > 1:
            per_rank = self.config.num_moe_experts // self.mpu.ep_size
            for local, global_name in mapping.items():
                match = _EXPERT_NAME.match(global_name)
                if match:
                    mapping[local] = f"{match.group(1)}{int(match.group(2)) + per_rank * self.mpu.ep_rank}"
        return mapping


def cpu_safe_overrides(use_te: bool) -> dict:
    """TransformerConfig flags whose fused kernels need TE/apex/CUDA: off unless TE is in use."""
    if use_te:
        return {}
    return dict(
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        moe_grouped_gemm=False,
        moe_permute_fusion=False,
        moe_router_fusion=False,
        moe_shared_expert_overlap=False,
        use_cpu_initialization=True,
    )


def make_bridge(
    hf_config: transformers.PretrainedConfig,
    layout: ParallelLayout,
    dtype: torch.dtype = torch.float32,
    use_te: bool | None = None,
    **config_overrides,
):
    """The mbridge bridge for `hf_config`, with our fixes, for the current megatron parallel state."""
    import mbridge  # noqa: F401  (registers the families)
    from mbridge.core.bridge import _MODEL_REGISTRY
    from mbridge.core.parallel_states import ParallelStates

    validate_hf_config(hf_config)
    if getattr(hf_config, "rope_theta", None) is None:
        hf_config.rope_theta = _rope_theta(hf_config)  # mbridge reads the transformers-4 attribute
    if hf_config.model_type == "mixtral" and getattr(hf_config, "head_dim", None) is None:
        hf_config.head_dim = hf_config.hidden_size // hf_config.num_attention_heads
    if use_te is None:
        use_te = detect().has_transformer_engine
    base = _MODEL_REGISTRY[hf_config.model_type]
    cls = type(f"Grpo{base.__name__}", (_GrpoBridgeMixin, base), {
        "_use_te": use_te, "_is_moe": hf_config.model_type in MOE_MODEL_TYPES})
    bridge = cls(hf_config, dtype=dtype, parallel_states=ParallelStates.get_default_parallel_states())
    bridge.set_extra_args(
        **cpu_safe_overrides(use_te),
        **router_settings(hf_config),
        sequence_parallel=layout.sp,
        **config_overrides,
    )
    return bridge
