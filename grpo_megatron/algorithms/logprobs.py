"""Log-prob of the target token and entropy from (vocab-parallel) logits, chunk by chunk.

Naive `log_softmax(logits).gather(...)` plus entropy keeps several `[N, V]` float32 copies
alive for backward. Here the forward pass keeps only per-row statistics (log Z, entropy) and
the backward pass recomputes softmax per chunk of rows, so the extra memory is a few
`[chunk, V_local]` buffers plus the logits gradient itself.

Vocab parallelism (megatron layout: TP rank r holds vocab slice [r * V_local, (r + 1) * V_local)):
each rank reduces its slice against its own row max, then one all-reduce MAX (row max) and one
all-reduce SUM (sum-exp, sum of exp * shifted logit, target logit; rescaled to the global max)
combine them; backward needs no communication, because the
gradient of a rank's logit slice only needs the global log Z and entropy saved from forward.

Why not megatron's `tensor_parallel.vocab_parallel_cross_entropy`: it reads the TP group and
rank from megatron's global parallel state, subtracts the max from the logits in place (the
caller's logits are still needed here, e.g. for the entropy) and materialises full `[N, V_local]`
softmax buffers, with no entropy. Its math (max all-reduce, masked target gather, sum-exp
all-reduce, gradient softmax - onehot) is what this module does, per chunk, with an explicit
process group so this library holds no global state.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

CHUNK_ELEMENTS_CPU = 1 << 20
"""Default logits per chunk on CPU: 4 MiB of float32 stays in cache, which makes the chunked
passes faster than naive whole-tensor ones (benchmarks/logprobs.py)."""
CHUNK_ELEMENTS_ACCELERATOR = 1 << 26
"""Default logits per chunk on GPU: 256 MiB of float32, few enough chunks that kernel launches
do not dominate, still a small fraction of a realistic [B * T, V_local] (not measured yet)."""


def _shifted(logits_chunk: torch.Tensor, temperature: float, row_offset: torch.Tensor) -> torch.Tensor:
    """logits_chunk / temperature - row_offset (per row), as a fresh buffer in the compute dtype."""
    x = logits_chunk.to(row_offset.dtype)
    if temperature != 1.0:
        return (x / temperature).sub_(row_offset.unsqueeze(-1))
    return x - row_offset.unsqueeze(-1)


class _LogprobsAndEntropy(torch.autograd.Function):
    """Rows of `logits2d [N, V_local]`: (log p(target), entropy), both `[N]`, in the compute dtype.

    Per row, with x = logits / temperature, log Z = log sum_v exp(x_v) (over the full vocab):
        log p(target) = x_target - log Z
        H = -sum_v p_v log p_v = log Z - sum_v p_v x_v
    and for the backward pass:
        d log p(target) / dx_v = 1[v = target] - p_v
        d H / dx_v = -p_v (log p_v + H)
    """

    @staticmethod
    def forward(ctx, logits2d, targets, temperature, group, chunk_rows):  # type: ignore[override]
        num_rows, vocab = logits2d.shape
        compute_dtype = torch.promote_types(logits2d.dtype, torch.float32)
        vocab_start = dist.get_rank(group) * vocab if group is not None else 0
        local_targets = targets - vocab_start
        in_slice = (local_targets >= 0) & (local_targets < vocab)
        local_targets = local_targets.clamp(0, vocab - 1)

        row_max = torch.empty(num_rows, dtype=compute_dtype, device=logits2d.device)
        # Per row: sum exp(x - row max), sum exp(x - row max) * (x - row max), target logit x_target.
        partials = torch.empty(num_rows, 3, dtype=compute_dtype, device=logits2d.device)
        for start in range(0, num_rows, chunk_rows):
            rows = slice(start, start + chunk_rows)
            local_max = logits2d[rows].amax(dim=-1).to(compute_dtype) / temperature
            shifted = _shifted(logits2d[rows], temperature, local_max)
            exp = shifted.exp()
            row_max[rows] = local_max
            partials[rows, 0] = exp.sum(-1)
            partials[rows, 1] = torch.linalg.vecdot(exp, shifted)
        target_logit = logits2d.gather(-1, local_targets.unsqueeze(-1)).squeeze(-1).to(compute_dtype) / temperature
        partials[:, 2] = target_logit.masked_fill_(~in_slice, 0.0)

        if group is not None:
            global_max = row_max.clone()
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
            # Move each rank's partial sums from its own row max to the global one.
            offset = row_max - global_max
            scale = offset.exp()
            partials[:, 1] = scale * (partials[:, 1] + partials[:, 0] * offset)
            partials[:, 0] = scale * partials[:, 0]
            dist.all_reduce(partials, op=dist.ReduceOp.SUM, group=group)
            row_max = global_max
        sum_exp, sum_exp_shifted, target_logit = partials.unbind(-1)
        log_z = row_max + sum_exp.log()
        logprobs = target_logit - log_z
        entropy = sum_exp.log() - sum_exp_shifted / sum_exp

        ctx.save_for_backward(logits2d, local_targets, in_slice, log_z, entropy)
        ctx.temperature, ctx.chunk_rows = temperature, chunk_rows
        ctx.set_materialize_grads(False)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):  # type: ignore[override]
        logits2d, local_targets, in_slice, log_z, entropy = ctx.saved_tensors
        temperature = ctx.temperature
        grad_logits = torch.empty_like(logits2d)
        if grad_logprobs is None and grad_entropy is None:
            return grad_logits.zero_(), None, None, None, None
        # grad_logits = (g_lp * onehot - p * (g_lp + g_H * (log p + H))) / T
        #             = p * (a + b * log p) + onehot * g_lp / T,  a = -(g_lp + g_H * H) / T,  b = -g_H / T
        zeros = torch.zeros_like(log_z)
        g_lp = zeros if grad_logprobs is None else grad_logprobs
        g_h = zeros if grad_entropy is None else grad_entropy
        a = ((g_lp + g_h * entropy) / -temperature).unsqueeze(-1)
        b = (g_h / -temperature).unsqueeze(-1)
        target_grad = (g_lp / temperature).masked_fill_(~in_slice, 0.0).unsqueeze(-1)
        write_in_place = grad_logits.dtype == log_z.dtype
        for start in range(0, logits2d.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            log_p = _shifted(logits2d[rows], temperature, log_z[rows])
            p = log_p.exp()
            out = grad_logits[rows] if write_in_place else log_p
            if grad_entropy is None:
                torch.mul(p, a[rows], out=out)
            else:
                torch.addcmul(a[rows], log_p, b[rows], out=out).mul_(p)
            out.scatter_add_(-1, local_targets[rows].unsqueeze(-1), target_grad[rows])
            if not write_in_place:
                grad_logits[rows] = out
        return grad_logits, None, None, None, None


def token_logprobs_and_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    process_group: dist.ProcessGroup | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each target token and the entropy of each position, from logits `[..., V_local]`.

    targets: `[...]` global vocab ids. temperature: logits are divided by it (as in sampling).
    process_group: the tensor-parallel group the vocab is sharded over (None: unsharded).
    chunk_size: rows per chunk (default: about CHUNK_ELEMENTS_CPU / CHUNK_ELEMENTS_ACCELERATOR logits).
    Returns two `[...]` tensors in float32 (float64 for float64 logits), differentiable with
    respect to `logits`. Logits must be finite.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"targets must be logits.shape[:-1] = {tuple(logits.shape[:-1])}, got {tuple(targets.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    vocab = logits.shape[-1]
    logits2d = logits.reshape(-1, vocab)
    if chunk_size is None:
        chunk_elements = CHUNK_ELEMENTS_CPU if logits.device.type == "cpu" else CHUNK_ELEMENTS_ACCELERATOR
        chunk_size = max(1, chunk_elements // vocab)
    logprobs, entropy = _LogprobsAndEntropy.apply(logits2d, targets.reshape(-1), temperature, process_group, chunk_size)
    return logprobs.view(targets.shape), entropy.view(targets.shape)
