"""OPD in the learner's loss path, megatron faked as in test_loss_path: each mini-batch's loss is the seed-formula
loss (tests/algorithms/reference.py) with the advantages written out here from the OPD formulas, for both modes,
the old log-probs of each source, tool tokens masked, and the top-k loss term."""
from __future__ import annotations

import math

import pytest
import torch

from grpo_megatron.algorithms.opd import vocab_logprobs_at
from grpo_megatron.config import OPDConfig
from grpo_megatron.rollout.sglang.teacher import TeacherScores
from grpo_megatron.training.batch import make_micro_batch
from grpo_megatron.training.metrics import PhaseTimer
from grpo_megatron.training.opd import prepare_training_micro_batches
from tests.algorithms import reference
from tests.training.test_loss_path import (
    CASES, G, MAX_NEW_TOKENS, FakeActor, current_logprobs, make_samples, make_learner, recomputed_old)
from tests.training.test_multiturn_loss_mask import GARBAGE, garbled, with_tool_tokens

VOCAB, TOP_K = 24, 3


def teacher_logprobs(i: int, n: int) -> list[float]:
    return [-0.4 - 0.17 * ((2 * i + 3 * j) % 5) for j in range(n)]


def teacher_logits(i: int, j: int) -> torch.Tensor:
    return torch.sin(torch.arange(VOCAB, dtype=torch.float64) * (0.7 + 0.1 * i) + j) * 2.5


def student_logits(row_key: int, position: int) -> torch.Tensor:
    return torch.cos(torch.arange(VOCAB, dtype=torch.float64) * (0.3 + 0.05 * row_key) + 0.5 * position) * 2.0


class FakeTeacher:
    """SGLangTeacher's interface: scores (prompt, response) pairs; GARBAGE at tool tokens when asked."""

    def __init__(self, samples, top_k: int = 0):
        self.samples, self.top_k, self.asked = samples, top_k, []

    def score(self, pairs):
        self.asked.append(pairs)
        out = []
        for i, (s, (prompt, response)) in enumerate(zip(self.samples, pairs)):
            assert (prompt, response) == (s.prompt_ids, s.response_ids)  # the tokens as sampled
            values = torch.tensor(teacher_logprobs(i, len(response)))
            if s.loss_mask is not None:
                values = torch.where(torch.tensor(s.loss_mask) == 0, GARBAGE, values)
            scores = TeacherScores(values)
            if self.top_k:
                logits = torch.stack([teacher_logits(i, j) for j in range(len(response))])
                lp = torch.log_softmax(logits, -1)
                scores.topk_logprobs, scores.topk_ids = (t.float() if t.is_floating_point() else t
                                                         for t in lp.topk(self.top_k, -1))
            out.append(scores)
        return out


class TopKFakeActor(FakeActor):
    """Runs each micro-batch's on_logits hook on fixed student logits, as megatron's schedule would."""

    def train_step(self, micro, loss_fn, temperature) -> dict:
        outputs = []
        for mb in micro:
            logits = torch.stack([torch.stack([student_logits(i, p) for p in range(mb.tokens.shape[1])])
                                  for i in mb.indices]).float()
            hooked = mb.on_logits(mb, logits, temperature, None)
            outputs.append(loss_fn(hooked, self.logprobs(mb), torch.zeros(mb.tokens.shape)))
        self.calls.append({"loss": sum(float(loss) for loss, _ in outputs), "metrics": [m for _, m in outputs],
                           "rows": sorted(i for mb in micro for i in mb.indices)})
        return {"pg_loss": self.calls[-1]["loss"]}


def opd_trainer(monkeypatch, samples, case: str, opd: OPDConfig, loss: str = "grpo", actor=None):
    algorithm, rollout, num_minibatches, _ = CASES[case]
    algorithm = {**algorithm, "loss": loss, "kl_coef": 0.0, "opd": opd}
    learner = make_learner(monkeypatch, samples, algorithm, rollout, num_minibatches, with_reference=False)
    learner.teacher = FakeTeacher(samples, opd.top_k)
    if actor is not None:
        learner.actor = actor
    return learner


def old_logprobs_of(learner, samples, case: str) -> dict:
    if learner.spec.update.use_engine_logprobs:
        return {i: s.engine_logprobs for i, s in enumerate(samples)}
    if CASES[case][2] == 1:
        return {i: current_logprobs(i, len(s.response_ids)) for i, s in enumerate(samples)}
    return recomputed_old(samples)


def expected(samples, rows, alg, old, opd: OPDConfig, topk_kl=None) -> tuple[float, float]:
    """(loss, mean teacher KL) of mini-batch `rows` from per-sample lists."""
    group = reference.group_advantages([s.reward for s in samples], G, normalize_std=alg.advantage == "grpo",
                                       eps=1e-6)
    width = max(len(samples[i].response_ids) for i in rows)
    logp, old_t, adv, mask = (torch.zeros(len(rows), width, dtype=torch.float64) for _ in range(4))
    kl_sum, kl_count = 0.0, 0
    for r, i in enumerate(rows):
        s, n = samples[i], len(samples[i].response_ids)
        logp[r, :n] = torch.tensor(current_logprobs(i, n), dtype=torch.float64)
        old_t[r, :n] = torch.as_tensor(old[i], dtype=torch.float64)
        teacher = teacher_logprobs(i, n)
        for j in range(n):
            inside = (s.loss_mask is None or s.loss_mask[j] == 1) and not (alg.overlong_filter and s.truncated)
            mask[r, j] = float(inside)
            if not inside:
                continue
            kl_sum, kl_count = kl_sum + float(old[i][j]) - teacher[j], kl_count + 1
            signal = opd.coef * (teacher[j] - float(old[i][j])) if not opd.top_k else 0.0
            adv[r, j] = signal + (group[i] if opd.mode == "rl" else 0.0)
    if opd.top_k:  # the policy loss keeps the group's per-sequence advantages (or none)
        adv = torch.tensor([group[i] if opd.mode == "rl" else 0.0 for i in rows], dtype=torch.float64)
    loss = float(reference.policy_loss(logp, old_t, adv, mask, alg.loss, alg.clip_low, alg.clip_high, alg.loss_agg,
                                       max_len=MAX_NEW_TOKENS))
    if topk_kl is not None:
        seqs = [[topk_kl(i, j) for j in range(len(samples[i].response_ids)) if mask[r, j]] for r, i in enumerate(rows)]
        seqs = [seq for seq in seqs if seq]
        if alg.loss_agg == "token_mean":
            term = sum(map(sum, seqs)) / sum(map(len, seqs))
        elif alg.loss_agg == "seq_mean_token_mean":
            term = sum(sum(seq) / len(seq) for seq in seqs) / len(seqs)
        else:
            term = sum(sum(seq) / MAX_NEW_TOKENS for seq in seqs) / len(seqs)
        loss += opd.coef * term
    return loss, kl_sum / max(kl_count, 1)


@pytest.mark.parametrize("mode", ["distill", "rl"])
@pytest.mark.parametrize("case, loss", [("engine_old", "grpo"), ("recomputed_old", "gspo_token"),
                                        ("training_pass_is_old", "grpo")])
def test_each_minibatch_gets_the_opd_reference_loss(mode, case, loss, monkeypatch):
    samples = make_samples()
    opd = OPDConfig(teacher="sglang", mode=mode, coef=0.8)
    learner = opd_trainer(monkeypatch, samples, case, opd, loss)
    timer = PhaseTimer()
    learner.update(samples, 0, timer)
    assert "time/teacher" in timer.times
    assert len(learner.teacher.asked) == 1  # one scoring per step, of every sample
    old = old_logprobs_of(learner, samples, case)
    for call in learner.actor.calls:
        want, kl = expected(samples, call["rows"], learner.spec.update.algorithm, old, opd)
        assert call["loss"] == pytest.approx(want, rel=1e-5, abs=1e-7), (mode, case)
        tokens = [float(m["opd/teacher_kl"]) for m in call["metrics"]]
        assert len(tokens) == len(call["metrics"])


def test_tool_tokens_are_out_of_the_opd_signal_and_metric(monkeypatch):
    """GARBAGE teacher and old log-probs at tool tokens: loss and teacher KL are the ones with them masked out."""
    samples = with_tool_tokens(make_samples())
    opd = OPDConfig(teacher="sglang", mode="rl", coef=0.5)
    learner = opd_trainer(monkeypatch, samples, "recomputed_old", opd, "grpo")
    clean = recomputed_old(samples)
    learner.logprobs = lambda model, batch: garbled(clean, samples)
    micro_rows = []
    train_step = learner.actor.train_step
    learner.actor.train_step = lambda micro, *args: (micro_rows.append([mb.indices for mb in micro]),
                                                     train_step(micro, *args))[1]
    learner.update(samples, 0, PhaseTimer())
    for call, rows_of_micro in zip(learner.actor.calls, micro_rows):
        want, _ = expected(samples, call["rows"], learner.spec.update.algorithm, clean, opd)
        assert call["loss"] == pytest.approx(want, rel=1e-5, abs=1e-7)
        for metrics, rows in zip(call["metrics"], rows_of_micro):  # the mean over each micro-batch's loss tokens
            _, kl = expected(samples, rows, learner.spec.update.algorithm, clean, opd)
            assert float(metrics["opd/teacher_kl"]) == pytest.approx(kl, rel=1e-5, abs=1e-6)


def _topk_kl_reference(samples, temperature: float):
    """The student at the rollout temperature, the teacher's values as it gave them."""
    def kl(i: int, j: int) -> float:
        s = samples[i]
        position = len(s.prompt_ids) - 1 + j
        log_q = torch.log_softmax(student_logits(i, position).float().double() / temperature, -1)
        log_p = torch.log_softmax(teacher_logits(i, j), -1)
        ids = log_p.topk(TOP_K).indices.tolist()
        q = [math.exp(log_q[v]) for v in ids]
        p = [math.exp(float(log_p[v].float())) for v in ids]
        value = sum(qv * (math.log(qv) - math.log(pv)) for qv, pv in zip(q, p))
        return value + (1 - sum(q)) * (math.log(1 - sum(q)) - math.log(1 - sum(p)))
    return kl


@pytest.mark.parametrize("mode", ["distill", "rl"])
def test_topk_mode_adds_the_tail_aware_reverse_kl_over_the_teachers_topk(mode, monkeypatch):
    samples = make_samples()
    opd = OPDConfig(teacher="sglang", mode=mode, coef=0.6, top_k=TOP_K)
    learner = opd_trainer(monkeypatch, samples, "recomputed_old", opd, "gspo", actor=TopKFakeActor(samples))
    learner.update(samples, 0, PhaseTimer())
    for call in learner.actor.calls:
        want, _ = expected(samples, call["rows"], learner.spec.update.algorithm, recomputed_old(samples), opd,
                           _topk_kl_reference(samples, learner.spec.update.temperature))
        assert call["loss"] == pytest.approx(want, rel=1e-4, abs=1e-6), mode
        assert all(float(m["opd/topk_kl"]) > 0 for m in call["metrics"])


def test_student_topk_hook_reads_the_logits_at_the_teachers_ids():
    logits = torch.randn(2, 5, VOCAB, dtype=torch.float64)
    ids = torch.randint(0, VOCAB, (2, 5, TOP_K))
    want = torch.log_softmax(logits / 0.8, -1).gather(-1, ids)
    torch.testing.assert_close(vocab_logprobs_at(logits, ids, 0.8), want)


@pytest.mark.parametrize("teacher, top_k, hooked", [("sglang", 3, True), ("sglang", 0, False), ("none", 3, False)])
def test_only_the_top_k_mode_reads_the_students_logits_at_the_teachers_ids(teacher, top_k, hooked):
    mb = make_micro_batch(make_samples(), [0, 1], pad_id=0)
    prepare_training_micro_batches(OPDConfig(teacher=teacher, top_k=top_k), [mb])
    assert (mb.on_logits is not None) == hooked
