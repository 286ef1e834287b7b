"""MoE experts through torch's grouped GEMM, for megatron's local layer spec on CPU.

Without TransformerEngine megatron-core runs the experts as `SequentialMLP`: a Python loop over the local
experts, each a fc1 -> GLU -> fc2 through megatron's linear autograd functions, with a split of the
permuted tokens before and a `cat` after (and their mirror images in the backward). At RL shapes (a few
hundred tokens per expert) that loop is mostly per-op overhead. `GroupedMMSequentialMLP` keeps
SequentialMLP's parameters, names and checkpoint format (each expert's own `linear_fc1`/`linear_fc2`), and
computes all experts with two `torch._grouped_mm` calls over the experts' weights stacked for the pass.
The gradients reach each expert's own parameter (the stack's backward splits them), so megatron's DDP
hooks, optimizer and checkpoints see nothing different.

Stacking copies the weights every pass, so the grouped path only pays while each expert is small
(`python benchmarks/moe_experts.py`, 8 experts, 2 threads, forward+backward): at width 128 it took
0.64-0.91x the loop's time over 1024-8192 token-expert pairs, at width 256 0.99-1.22x, at 512 and 1024
1.06x and 1.23x. It runs for experts of at most `GROUPED_MAX_EXPERT_ELEMENTS` weight elements; larger
experts, and every case the grouped path does not cover (fp8, expert tensor parallelism, biases, clamped
GLU, probabilities applied on the input, delayed weight gradients, a non-CPU device), run SequentialMLP's
own loop.
"""
from __future__ import annotations

import torch
from megatron.core.transformer.moe.experts import SequentialMLP


GROUPED_MAX_EXPERT_ELEMENTS = 2**16  # per expert (fc1 + fc2): width 128 (49k) fits, width 256 (197k) does not


class GroupedMMSequentialMLP(SequentialMLP):
    """megatron's SequentialMLP computed with one grouped GEMM per projection instead of a loop per expert."""

    def _grouped_applies(self, hidden: torch.Tensor) -> bool:
        config = self.config
        return (
            hidden.device.type == "cpu"
            and self.num_local_experts > 1
            and self.tp_group.size() == 1
            and not (config.fp8 or config.fp4)
            and not config.moe_apply_probs_on_input
            and not config.add_bias_linear
            and config.activation_func_clamp_value is None
            and not getattr(config, "delay_wgrad_compute", False)
            and sum(p.numel() for p in self.local_experts[0].parameters()) <= GROUPED_MAX_EXPERT_ELEMENTS
        )

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor):
        """Tokens sorted by expert [n, h], counts per local expert [E], router probabilities [n] -> ([n, h], None)."""
        if not self._grouped_applies(permuted_local_hidden_states):
            return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)
        return self.grouped_forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)

    def grouped_forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                        permuted_probs: torch.Tensor):
        """The grouped-GEMM computation itself (only valid where `_grouped_applies`, size aside)."""
        experts = self.local_experts
        offsets = torch.cumsum(tokens_per_expert.to(device="cpu", dtype=torch.int64), 0).to(torch.int32)
        # [E, out, in] stacked, seen as [E, in, out]: x [n, in] @ w[e] for the rows of expert e.
        fc1 = torch.stack([e.linear_fc1.weight for e in experts]).transpose(1, 2)
        fc2 = torch.stack([e.linear_fc2.weight for e in experts]).transpose(1, 2)
        hidden = permuted_local_hidden_states.to(fc1.dtype)
        intermediate = torch._grouped_mm(hidden, fc1, offs=offsets)
        if self.config.gated_linear_unit:
            gate, linear = torch.chunk(intermediate, 2, dim=-1)
            intermediate = self.config.activation_func(gate) * (linear + self.config.glu_linear_offset)
        else:
            intermediate = self.config.activation_func(intermediate)
        intermediate = (intermediate * permuted_probs.unsqueeze(-1)).to(fc2.dtype)
        return torch._grouped_mm(intermediate, fc2, offs=offsets), None


def use_grouped_mm_experts(block_spec) -> None:
    """Replace megatron's `SequentialMLP` experts with `GroupedMMSequentialMLP` in a decoder block spec."""
    for layer_spec in getattr(block_spec, "layer_specs", None) or [block_spec]:
        mlp = getattr(layer_spec.submodules, "mlp", None)
        experts = getattr(getattr(mlp, "submodules", None), "experts", None)
        if experts is not None and getattr(experts, "module", None) is SequentialMLP:
            experts.module = GroupedMMSequentialMLP
