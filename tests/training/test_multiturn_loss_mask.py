"""Tool tokens (loss mask 0) carry no gradient and are not in the loss normaliser, KL, the train-vs-rollout
metrics or the mismatch correction: with garbage log-probs at exactly those positions the learner's loss is
the seed-formula loss with them masked out. Megatron is faked as in test_loss_path."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from grpo_megatron.config import RolloutCorrectionConfig
from grpo_megatron.samples import Sample
from grpo_megatron.training.batch import make_micro_batch
from grpo_megatron.training.update_math import loss_mask
from grpo_megatron.training.metrics import PhaseTimer
from tests.algorithms import reference
from tests.training.test_loss_path import (
    CASES, G, MAX_NEW_TOKENS, current_logprobs, make_samples, make_learner, recomputed_old, reference_logprobs)

GARBAGE = 7.5  # a log-prob no sampled token has: anywhere in the loss it would dominate it


def with_tool_tokens(samples: list[Sample]) -> list[Sample]:
    """Mask some response tokens of most samples as tool output, and put GARBAGE at those positions."""
    for i, s in enumerate(samples):
        mask = [0 if j > 0 and (i + j) % 3 == 1 else 1 for j in range(len(s.response_ids))]
        samples[i] = replace(s, loss_mask=mask,
                             engine_logprobs=[GARBAGE if m == 0 else v for m, v in zip(mask, s.engine_logprobs)])
    assert sum(m == 0 for s in samples for m in s.loss_mask) >= 4
    return samples


def garbled(values: dict[int, torch.Tensor], samples: list[Sample]) -> dict[int, torch.Tensor]:
    return {i: torch.where(torch.tensor(samples[i].loss_mask) == 0, GARBAGE, v) for i, v in values.items()}


def expected_loss(samples, rows, alg, old, ref) -> float:
    adv = reference.group_advantages([s.reward for s in samples], G, normalize_std=alg.advantage == "grpo", eps=1e-6)
    width = max(len(samples[i].response_ids) for i in rows)
    logp, old_t, ref_t, mask = (torch.zeros(len(rows), width, dtype=torch.float64) for _ in range(4))
    for r, i in enumerate(rows):
        n = len(samples[i].response_ids)
        logp[r, :n] = torch.tensor(current_logprobs(i, n), dtype=torch.float64)
        old_t[r, :n] = torch.as_tensor(old[i], dtype=torch.float64)
        ref_t[r, :n] = torch.as_tensor(ref[i], dtype=torch.float64)
        mask[r, :n] = torch.tensor(samples[i].loss_mask, dtype=torch.float64)
    adv_t = torch.tensor([adv[i] for i in rows], dtype=torch.float64)
    return float(reference.policy_loss(logp, old_t, adv_t, mask, alg.loss, alg.clip_low, alg.clip_high, alg.loss_agg,
                                       ref=ref_t, kl_coef=alg.kl_coef, kl_estimator=alg.kl_estimator,
                                       dual_c=alg.dual_clip_c, max_len=MAX_NEW_TOKENS))


@pytest.mark.parametrize("loss, loss_agg", [("gspo", "seq_mean_token_mean"), ("grpo", "token_mean"),
                                            ("gspo_token", "seq_mean_token_sum_norm")])
def test_tool_tokens_are_out_of_the_loss_normaliser_and_kl(loss, loss_agg, monkeypatch):
    samples = with_tool_tokens(make_samples())
    algorithm, rollout, num_minibatches, _ = CASES["recomputed_old"]
    learner = make_learner(monkeypatch, samples, {**algorithm, "loss": loss, "loss_agg": loss_agg}, rollout,
                           num_minibatches, with_reference=True)
    clean = {"policy": recomputed_old(samples), "reference": reference_logprobs(samples)}
    learner.logprobs = lambda model, batch: garbled(clean[model], samples)
    metrics = learner.update(samples, 0, PhaseTimer())
    for call in learner.actor.calls:
        want = expected_loss(samples, call["rows"], learner.spec.update.algorithm, clean["policy"], clean["reference"])
        assert call["loss"] == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert all(abs(v) < 5 for k, v in metrics.items() if k.startswith("train_rollout/"))


def test_tool_tokens_are_out_of_the_mismatch_correction(monkeypatch):
    """A veto on any token ratio below 1e-4 would reject every sample holding a GARBAGE engine log-prob."""
    samples = with_tool_tokens(make_samples())
    algorithm, rollout, num_minibatches, _ = CASES["recomputed_old"]
    correction = RolloutCorrectionConfig(mode="tis", high=2.0, veto=1e-4)
    algorithm = {**algorithm, "kl_coef": 0.0, "rollout_correction": correction}
    metrics = make_learner(monkeypatch, samples, algorithm, rollout, num_minibatches,
                           with_reference=False).update(samples, 0, PhaseTimer())
    assert metrics["rollout_correction/frac_rejected"] == 0.0


def test_micro_batch_loss_mask_sits_on_the_response_positions():
    samples = [Sample(prompt_ids=[1, 2], response_ids=[3, 4, 5], group=0, loss_mask=[1, 0, 1]),
               Sample(prompt_ids=[1], response_ids=[3, 4], group=0)]
    mb = make_micro_batch(samples, [0, 1], pad_id=0)  # width 5; response of row 0 at positions 1..3
    assert mb.loss_mask.tolist() == [[0, 1, 0, 1, 0], [1, 1, 0, 0, 0]]
    assert loss_mask(samples, mb).tolist() == [[0, 1, 0, 1, 0], [1, 1, 0, 0, 0]]
    assert make_micro_batch(samples, [1], pad_id=0).loss_mask is None  # no tool tokens: nothing changes
