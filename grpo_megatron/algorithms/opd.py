"""On-policy distillation (OPD): a teacher scores the student's own sampled tokens.

With y_t sampled from the student q (at the rollout temperature T) and the teacher p scored at the same
temperature, the per-token reverse KL estimate is

    kl_t = log q(y_t | y_<t) - log p(y_t | y_<t)        (k1 of KL(q || p), in float32)

and E_{y~q}[grad log q(y) * (-kl)] = -grad KL(q || p) at each position, so -kl is a per-token advantage
(Thinking Machines' OPD, slime's `--opd-kl-coef`, Tinker). Two ways to use it:

    distill:  A_t = coef * (log p(y_t) - log q(y_t))                 (the reward is not used)
    rl:       A_t = A_group + coef * (log p(y_t) - log q(y_t))       (added to the group advantage)

Top-k variant: the teacher returns its k most likely tokens at every response position; the loss term
is the reverse KL between student and teacher coarse-grained to those k tokens plus one tail bucket,

    KL_k = sum_{v in top-k} q_v (log q_v - log p_v) + q_tail (log q_tail - log p_tail),  x_tail = 1 - sum x_v,

which is the exact KL of two (k + 1)-category distributions: >= 0, a lower bound of the full reverse KL,
and without the degenerate minimum of the truncated sum (q_v -> 0 on the support; verl #5041 note). It is
differentiated through the student's logits directly (no sampling), weighted by coef.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

OPD_MODES = ("distill", "rl")
TAIL_EPS = 1e-6
"""Floor of a tail mass before its log: a top-k that holds all the mass (1 - sum ~ 0 in float32) gives a
finite, near-zero tail term instead of 0 * log 0."""


def reverse_kl_per_token(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 estimate of KL(student || teacher) per sampled token, in float32 (float64 stays float64)."""
    dtype = torch.promote_types(student_logprobs.dtype, torch.float32)
    return student_logprobs.to(dtype) - teacher_logprobs.to(dtype)


def opd_advantages(
    group_advantages: torch.Tensor,
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    mode: str,
    coef: float,
) -> torch.Tensor:
    """Per-token advantages `[B, T]` of OPD mode `mode` (see the module docstring), detached, 0 off the mask.

    group_advantages: `[B]` from the reward; student/teacher log-probs: `[B, T]` of the sampled
    tokens; response_mask: tokens in the loss (sampled, not tool output).
    """
    if mode not in OPD_MODES:
        raise ValueError(f"unknown OPD mode {mode!r}; known: {', '.join(OPD_MODES)}")
    mask = response_mask.bool()
    advantages = -coef * reverse_kl_per_token(student_logprobs.detach(), teacher_logprobs.detach())
    if mode == "rl":
        advantages = advantages + group_advantages.unsqueeze(-1).to(advantages.dtype)
    return advantages.masked_fill(~mask, 0.0)


def topk_reverse_kl(student_topk_logprobs: torch.Tensor, teacher_topk_logprobs: torch.Tensor) -> torch.Tensor:
    """Tail-aware reverse KL over the teacher's top-k support, per position: `[..., k]` -> `[...]`.

    Both inputs are log-probs of the same k token ids under the full (temperature-scaled) distributions;
    gradients flow into the student's. Computed in float32 or wider.
    """
    dtype = torch.promote_types(student_topk_logprobs.dtype, torch.float32)
    log_q, log_p = student_topk_logprobs.to(dtype), teacher_topk_logprobs.detach().to(dtype)
    support = (log_q.exp() * (log_q - log_p)).sum(-1)
    log_q_tail = _log_tail(log_q)
    log_p_tail = _log_tail(log_p)
    return support + log_q_tail.exp() * (log_q_tail - log_p_tail)


def _log_tail(logprobs: torch.Tensor) -> torch.Tensor:
    """log(1 - sum_v exp(logprobs_v)), floored at log(TAIL_EPS)."""
    return torch.log((1.0 - torch.logsumexp(logprobs, dim=-1).exp()).clamp(min=TAIL_EPS))


class _SumOverRanks(torch.autograd.Function):
    """All-reduce SUM forward, identity backward: every rank of the group then computes the same (replicated)
    loss, whose gradient with respect to a rank's own summand is the incoming gradient itself (megatron's
    reduce_from_tensor_model_parallel_region; torch.distributed.nn's all_reduce would sum the replicas' gradients
    again, world-size times too large)."""

    @staticmethod
    def forward(ctx, tensor, group):  # type: ignore[override]
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None


def vocab_logprobs_at(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    temperature: float = 1.0,
    process_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """log softmax(logits / T) at `token_ids`, differentiable: logits `[..., V_local]`, ids `[..., k]` (global).

    Vocab-parallel like algorithms/logprobs.py: each rank holds the slice [r * V_local, (r + 1) * V_local); the
    picked logits and the sum-exp (against the global row max) are summed over `process_group`.
    """
    vocab = logits.shape[-1]
    x = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    if process_group is None:
        return x.gather(-1, token_ids) - torch.logsumexp(x, dim=-1, keepdim=True)
    start = dist.get_rank(process_group) * vocab
    local = token_ids - start
    in_slice = (local >= 0) & (local < vocab)
    picked = _SumOverRanks.apply(x.gather(-1, local.clamp(0, vocab - 1)).masked_fill(~in_slice, 0.0), process_group)
    row_max = x.detach().amax(dim=-1, keepdim=True)
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=process_group)
    sum_exp = _SumOverRanks.apply((x - row_max).exp().sum(-1, keepdim=True), process_group)
    return picked - (row_max + sum_exp.log())


@torch.no_grad()
def vocab_topk(
    logits: torch.Tensor, k: int, temperature: float = 1.0, process_group: dist.ProcessGroup | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs, global ids) `[..., k]` of the k most likely tokens of softmax(logits / T), vocab-parallel."""
    vocab = logits.shape[-1]
    x = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    values, ids = x.topk(min(k, vocab), dim=-1)
    log_z = torch.logsumexp(x, dim=-1, keepdim=True)
    if process_group is not None:
        ids = ids + dist.get_rank(process_group) * vocab
        size = dist.get_world_size(process_group)
        gathered = [torch.empty_like(t) for t in (values, ids, log_z) for _ in range(size)]
        for i, t in enumerate((values, ids, log_z)):
            dist.all_gather(gathered[i * size:(i + 1) * size], t.contiguous(), group=process_group)
        values, ids = torch.cat(gathered[:size], -1), torch.cat(gathered[size:2 * size], -1)
        log_z = torch.logsumexp(torch.cat(gathered[2 * size:], -1), dim=-1, keepdim=True)
        values, order = values.topk(k, dim=-1)
        ids = ids.gather(-1, order)
    return values - log_z, ids
