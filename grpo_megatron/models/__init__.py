"""Megatron-core policy models built from Hugging Face configs, and HF <-> megatron weight mapping."""
from grpo_megatron.models.bridge import SUPPORTED_MODEL_TYPES, UnsupportedModelError, validate_hf_config
from grpo_megatron.models.hf_weights import (
    WeightMismatchError, build_loaded_policy, export_hf_weights, load_hf_weights, save_hf_checkpoint)
from grpo_megatron.models.provider import PolicyModel, build_model, load_hf_config, model_dims

__all__ = [
    "SUPPORTED_MODEL_TYPES", "UnsupportedModelError", "validate_hf_config", "WeightMismatchError",
    "build_loaded_policy", "export_hf_weights", "load_hf_weights", "save_hf_checkpoint", "PolicyModel", "build_model",
    "load_hf_config", "model_dims",
]
