"""Fixes that make megatron-core's local (non-TransformerEngine) layer spec and torch's Adam usable.

Applied whenever TransformerEngine is absent, on CPU and on GPU alike (a GPU image without TE runs the same
local spec). Each patch names the megatron-core versions it targets; all are idempotent.
"""
from __future__ import annotations

import copy
import inspect

import torch


def apply_without_te_fixes() -> None:
    _define_te_general_gemm()
    _patch_unfused_rope()
    _patch_distributed_optimizer_load()
    _patch_sequence_parallel_norm()


def _define_te_general_gemm() -> None:
    """megatron-core 0.16.1 leaves `te_general_gemm` undefined (not None) without TE, so the MoE router's fp32
    gating raises NameError; None selects its torch fallback. 0.19.2 defines it as None: nothing to do there."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _patch_sequence_parallel_norm() -> None:
    """torch's norms refuse sequence_parallel (required for MoE with TP > 1) in megatron-core 0.16.1-0.19.2.

    A norm computes the same thing either way; like TE's norms, tag the weights `sequence_parallel` so that DDP
    all-reduces their gradients over the TP group.
    """
    from megatron.core.transformer import torch_norm

    if getattr(torch_norm.WrappedTorchNorm, "_grpo_patched", False):
        return
    original_new = torch_norm.WrappedTorchNorm.__new__

    def new(cls, config, hidden_size, *args, **kwargs):
        if not config.sequence_parallel:
            return original_new(cls, config, hidden_size, *args, **kwargs)
        plain = copy.copy(config)
        plain.sequence_parallel = False
        norm = original_new(cls, plain, hidden_size, *args, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    torch_norm.WrappedTorchNorm.__new__ = staticmethod(new)
    torch_norm.WrappedTorchNorm._grpo_patched = True


def _patch_distributed_optimizer_load() -> None:
    """Let megatron's distributed optimizer load a checkpoint, exactly, when it runs torch's Adam (no Apex/TE).

    megatron-core 0.16.1 and 0.19.2 (read in both) copy every per-parameter entry of the optimizer state from the checkpoint
    (`_set_main_param_and_optimizer_states`, distrib_optimizer.py), including torch Adam's `step`, which the
    fully reshardable format keeps in the common state instead: KeyError. Entries the checkpoint lacks keep
    their current value (the step, already set from the common state). The dp_reshardable format hands over
    the step of the optimizer being loaded (a non-persistent entry, 0 in a fresh one), which would overwrite the
    checkpoint's: skipped, as megatron's own model-space loader does.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if getattr(DistributedOptimizer, "_grpo_patched_load", False):
        return
    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        current = self._get_main_param_and_optimizer_states(model_param)
        loaded = {k: v for k, v in tensors.items() if k != "step"}
        return original(self, model_param, {**{k: v for k, v in current.items() if k not in loaded}, **loaded})

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states

    # Its load_state_dict then gives every parameter's torch-Adam state the *same* `step` tensor (`s["step"] =
    # step` in a loop), and torch's Adam increments each state's step in place: after a resume one optimizer
    # step advanced it once per parameter, so the bias correction was wrong from the first resumed step on.
    # One tensor per parameter, as before the save.
    original_load = DistributedOptimizer.load_state_dict

    def load_state_dict(self, state_dict):
        original_load(self, state_dict)
        for state in self.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()

    DistributedOptimizer.load_state_dict = load_state_dict
    DistributedOptimizer._grpo_patched_load = True


def _patch_unfused_rope() -> None:
    """Skip the copy at the end of megatron's unfused RoPE when it rotates the whole head (a speed-up only).

    Without TE's fused RoPE, megatron (0.16.1-0.19.2) ends every q/k rotation with `torch.cat((rotated,
    t[..., rot_dim:]))`, which copies q and k once more (and again in the backward) even when the pass-through
    part is empty. Same values. Partial rotary, MLA and any keyword this wrapper does not know (0.19 added
    `mla_rotary_interleaved`) keep megatron's function, so a release that extends the signature loses only
    the speed-up.
    """
    from megatron.core.models.common.embeddings import rope_utils

    original = rope_utils._apply_rotary_pos_emb_bshd
    if getattr(original, "_grpo_patched", False):
        return
    signature = inspect.signature(original)
    if list(signature.parameters)[:2] != ["t", "freqs"] or not {"rotary_interleaved", "mscale"} <= set(
            signature.parameters):
        return  # a signature this fast path was not written for: megatron's own function stays

    def apply(t, freqs, *args, **kwargs):
        bound = signature.bind(t, freqs, *args, **kwargs)
        bound.apply_defaults()
        options = dict(bound.arguments)
        del options["t"], options["freqs"]
        rotary_interleaved, mscale = options.pop("rotary_interleaved"), options.pop("mscale")
        # multi_latent_attention, mla_rotary_interleaved (0.19), ...: any of them set -> megatron's function
        if any(options.values()) or t.shape[-1] != freqs.shape[-1]:
            return original(*bound.args, **bound.kwargs)
        cos_ = (torch.cos(freqs) * mscale).to(t.dtype)
        sin_ = (torch.sin(freqs) * mscale).to(t.dtype)
        return (t * cos_) + (rope_utils._rotate_half(t, rotary_interleaved) * sin_)

    apply._grpo_patched, apply.__wrapped__ = True, original
    rope_utils._apply_rotary_pos_emb_bshd = apply
