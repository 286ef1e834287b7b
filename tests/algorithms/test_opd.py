"""OPD signal (algorithms/opd.py) against plain references written from the formulas: loops over tokens and
vocabulary entries, one scalar at a time, in float64; values and gradients."""
from __future__ import annotations

import math

import pytest
import torch

from grpo_megatron.algorithms.opd import (
    opd_advantages, reverse_kl_per_token, topk_reverse_kl, vocab_logprobs_at, vocab_topk)


def _reference_advantages(group, student, teacher, mask, mode, coef):
    rows = []
    for b in range(len(student)):
        row = []
        for t in range(len(student[b])):
            if not mask[b][t]:
                row.append(0.0)
                continue
            value = coef * (teacher[b][t] - student[b][t])
            row.append(value + (group[b] if mode == "rl" else 0.0))
        rows.append(row)
    return rows


def _reference_topk_kl(student_logits, teacher_logits, ids):
    """KL over {top-k ids} + tail of softmax(student) vs softmax(teacher), one position, from scratch."""
    def probs(logits):
        z = sum(math.exp(v) for v in logits)
        return [math.exp(v) / z for v in logits]

    q, p = probs(student_logits), probs(teacher_logits)
    kl = sum(q[i] * (math.log(q[i]) - math.log(p[i])) for i in ids)
    q_tail = 1 - sum(q[i] for i in ids)
    p_tail = 1 - sum(p[i] for i in ids)
    return kl + q_tail * (math.log(q_tail) - math.log(p_tail))


@pytest.mark.parametrize("mode", ["distill", "rl"])
def test_opd_advantages_match_reference(mode):
    gen = torch.Generator().manual_seed(0)
    student = -torch.rand(3, 5, generator=gen, dtype=torch.float64) * 3
    teacher = -torch.rand(3, 5, generator=gen, dtype=torch.float64) * 3
    group = torch.randn(3, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.float64)
    student[0, 3:] = float("nan")  # padding may hold anything
    got = opd_advantages(group, student, teacher, mask, mode, coef=0.7)
    want = _reference_advantages(group.tolist(), student.tolist(), teacher.tolist(), mask.tolist(), mode, 0.7)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))


def test_opd_advantages_are_detached_and_reject_unknown_mode():
    student = torch.zeros(1, 2, requires_grad=True)
    out = opd_advantages(torch.zeros(1), student, torch.zeros(1, 2), torch.ones(1, 2), "distill", 1.0)
    assert not out.requires_grad
    with pytest.raises(ValueError, match="unknown OPD mode 'forward'"):
        opd_advantages(torch.zeros(1), student, torch.zeros(1, 2), torch.ones(1, 2), "forward", 1.0)


def test_reverse_kl_is_fp32_for_bf16_inputs():
    student = torch.tensor([-1.0, -2.0], dtype=torch.bfloat16)
    teacher = torch.tensor([-1.5, -0.5], dtype=torch.bfloat16)
    kl = reverse_kl_per_token(student, teacher)
    assert kl.dtype == torch.float32
    torch.testing.assert_close(kl, torch.tensor([0.5, -1.5]))


def test_policy_gradient_of_the_signal_is_the_reverse_kl_gradient():
    """E_{y~q}[grad log q(y) * coef * (log p(y) - log q(y))] = -coef * grad KL(q || p): summed exactly over
    the vocabulary of one position (what sampling estimates), against autograd of the closed-form KL."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(7, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.log_softmax(torch.randn(7, generator=gen, dtype=torch.float64), -1)
    log_q = torch.log_softmax(logits, -1)
    ids = torch.arange(7)
    adv = opd_advantages(torch.zeros(1), log_q.detach().unsqueeze(0), teacher.unsqueeze(0), torch.ones(1, 7),
                         "distill", 2.0)[0]
    surrogate = -(log_q.exp().detach() * log_q[ids] * adv).sum()  # the policy-gradient loss, in expectation
    (grad_pg,) = torch.autograd.grad(surrogate, logits, retain_graph=True)
    kl = (log_q.exp() * (log_q - teacher)).sum()
    (grad_kl,) = torch.autograd.grad(2.0 * kl, logits)
    torch.testing.assert_close(grad_pg, grad_kl)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_topk_reverse_kl_value_and_gradient(temperature):
    gen = torch.Generator().manual_seed(2)
    vocab, k = 9, 3
    student_logits = torch.randn(2, 4, vocab, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher_logits = 2 * torch.randn(2, 4, vocab, generator=gen, dtype=torch.float64)
    teacher_lp, ids = vocab_topk(teacher_logits, k, temperature)
    student_lp = vocab_logprobs_at(student_logits, ids, temperature)
    kl = topk_reverse_kl(student_lp, teacher_lp)
    want = torch.tensor([[_reference_topk_kl((student_logits[b, t] / temperature).tolist(),
                                             (teacher_logits[b, t] / temperature).tolist(), ids[b, t].tolist())
                          for t in range(4)] for b in range(2)], dtype=torch.float64)
    torch.testing.assert_close(kl, want)
    assert (kl >= -1e-12).all()
    weights = torch.randn(2, 4, generator=gen, dtype=torch.float64)
    torch.autograd.gradcheck(
        lambda x: topk_reverse_kl(vocab_logprobs_at(x, ids, temperature), teacher_lp) * weights,
        (student_logits,))
    # the teacher's own top-k ids by plain sorting, and their log-probs
    for b in range(2):
        for t in range(4):
            row = (teacher_logits[b, t] / temperature).tolist()
            order = sorted(range(vocab), key=lambda v: -row[v])[:k]
            assert ids[b, t].tolist() == order
            log_z = math.log(sum(math.exp(v) for v in row))
            torch.testing.assert_close(teacher_lp[b, t], torch.tensor([row[v] - log_z for v in order],
                                                                      dtype=torch.float64))


def test_topk_reverse_kl_is_zero_for_equal_distributions_and_finite_when_topk_holds_all_mass():
    logits = torch.tensor([[3.0, 1.0, -2.0, 0.5]])
    lp, ids = vocab_topk(logits, 2)
    assert float(topk_reverse_kl(vocab_logprobs_at(logits, ids), lp).abs().max()) < 1e-6
    full, all_ids = vocab_topk(logits, 4)  # tail mass 0: the floor keeps it finite
    value = topk_reverse_kl(vocab_logprobs_at(logits + 0.1 * torch.arange(4.0), all_ids), full)
    assert torch.isfinite(value).all()


def test_vocab_parallel_branch_on_a_one_rank_group_equals_the_plain_one(dist_world1):
    """The process-group code path without a process launch (TP=2 itself: test_opd_tp.py, slow)."""
    import torch.distributed as dist

    gen = torch.Generator().manual_seed(3)
    logits = 3 * torch.randn(2, 3, 11, generator=gen, dtype=torch.float64)
    logits[0, 0, 10] = 9.0  # the last id among the top-k
    for temperature in (1.0, 0.6):
        want_lp, want_ids = vocab_topk(logits, 4, temperature)
        got_lp, got_ids = vocab_topk(logits, 4, temperature, dist.group.WORLD)
        torch.testing.assert_close(got_lp, want_lp)
        assert torch.equal(got_ids, want_ids) and int(want_ids[0, 0, 0]) == 10
        local = logits.clone().requires_grad_()
        whole = logits.clone().requires_grad_()
        weights = torch.randn(2, 3, generator=gen, dtype=torch.float64)
        got = topk_reverse_kl(vocab_logprobs_at(local, want_ids, temperature, dist.group.WORLD), want_lp)
        want = topk_reverse_kl(vocab_logprobs_at(whole, want_ids, temperature), want_lp)
        torch.testing.assert_close(got, want)
        (weights * got).sum().backward()
        (weights * want).sum().backward()
        torch.testing.assert_close(local.grad, whole.grad)
