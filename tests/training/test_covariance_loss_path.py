"""The covariance losses in the learner's loss path (fake model of test_loss_path): their tokens are selected
once per mini-batch, over all of its tokens (every micro-batch and data-parallel rank), from the old
log-probs, so that neither the micro-batch size nor the DP split changes the step."""
from __future__ import annotations

import pytest
import torch

from grpo_megatron.algorithms import LossParams
from grpo_megatron.config import LossParamsConfig
from grpo_megatron.training import learner as learner_module
from grpo_megatron.training.metrics import PhaseTimer
from tests.algorithms import reference, reference_losses
from tests.training.test_loss_path import G, MAX_NEW_TOKENS, current_logprobs, make_samples, make_learner, recomputed_old

PARAMS = {"kl_cov_ratio": 0.2, "kl_cov_coef": 0.5, "clip_cov_ratio": 0.2, "clip_cov_lb": 0.0, "clip_cov_ub": 5.0}


def run(monkeypatch, loss: str, num_minibatches: int, micro_batch_size: int, dp: tuple[int, int] = (0, 1)):
    samples = make_samples()
    algorithm = {"loss": loss, "loss_agg": "token_mean", "clip_low": None, "clip_high": None,
                 "loss_params": LossParamsConfig(**PARAMS)}
    learner = make_learner(monkeypatch, samples, algorithm, {"use_engine_logprobs": False}, num_minibatches, False,
                           micro_batch_size=micro_batch_size)
    monkeypatch.setattr(learner_module, "data_parallel_info", lambda: dp)
    learner.update(samples, 3, PhaseTimer())
    selected = {i: s.trainer.loss_selection.tolist() for i, s in enumerate(samples)}
    return [c["loss"] for c in learner.actor.calls], selected, samples


def expected_kl_cov_loss(samples, rows) -> float:
    """Loops: advantages, the covariance of the recomputed old log-probs over the mini-batch's tokens, its
    top max(int(k N), 1), then the KL-Cov loss of the fake policy."""
    adv = reference.group_advantages([s.reward for s in samples], G, normalize_std=True, eps=1e-6)
    old = recomputed_old(samples)
    width = max(len(samples[i].response_ids) for i in rows)
    logp, old_t, mask = (torch.zeros(len(rows), width, dtype=torch.float64) for _ in range(3))
    for r, i in enumerate(rows):
        n = len(samples[i].response_ids)
        logp[r, :n] = torch.tensor(current_logprobs(i, n), dtype=torch.float64)
        old_t[r, :n] = old[i].double()
        mask[r, :n] = 1.0
    adv_t = torch.tensor([adv[i] for i in rows], dtype=torch.float64)
    cov = reference_losses.covariances(old_t, adv_t, mask)
    count = max(int(PARAMS["kl_cov_ratio"] * len(cov)), 1)
    ranked = sorted(cov.values(), reverse=True)
    assert ranked[count - 1] > ranked[count]  # no tie at the cut
    selection = torch.zeros_like(mask)
    for key in sorted(cov, key=cov.get, reverse=True)[:count]:
        selection[key] = 1.0
    params = LossParams(**PARAMS)
    return float(reference_losses.policy_loss(logp, old_t, adv_t, mask, "kl_cov", None, params, "token_mean",
                                              selection, max_len=MAX_NEW_TOKENS))


@pytest.mark.parametrize("num_minibatches", [1, 2])
def test_kl_cov_selects_over_the_whole_minibatch_from_the_old_logprobs(num_minibatches, monkeypatch):
    """With one mini-batch the old-policy pass still runs (the selection precedes the training pass)."""
    losses, _, samples = run(monkeypatch, "kl_cov", num_minibatches, micro_batch_size=3)
    per = len(samples) // num_minibatches
    for m, loss in enumerate(losses):
        expected = expected_kl_cov_loss(samples, list(range(m * per, (m + 1) * per)))
        assert loss == pytest.approx(expected, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("loss", ["clip_cov", "kl_cov"])
def test_micro_batch_size_and_dp_split_change_neither_selection_nor_loss(loss, monkeypatch):
    whole_losses, whole_selection, samples = run(monkeypatch, loss, 2, micro_batch_size=8)
    total = sum(sum(s) for s in whole_selection.values())
    tokens = [sum(len(samples[i].response_ids) for i in range(m * 4, m * 4 + 4)) for m in range(2)]
    assert total == sum(max(int(0.2 * n), 1) for n in tokens)  # one global draw per mini-batch
    for micro in (1, 3):
        losses, selection, _ = run(monkeypatch, loss, 2, micro_batch_size=micro)
        assert selection == whole_selection
        assert losses == pytest.approx(whole_losses, rel=1e-6)
    rank_losses = [run(monkeypatch, loss, 2, micro_batch_size=1, dp=(rank, 2)) for rank in (0, 1)]
    assert all(selection == whole_selection for _, selection, _ in rank_losses)
    summed = [a + b for a, b in zip(rank_losses[0][0], rank_losses[1][0])]
    assert summed == pytest.approx(whole_losses, rel=1e-6)


def test_clip_cov_draws_anew_each_step_and_seed(monkeypatch):
    """The draw is seeded by (train.seed, step, mini-batch): the same on every rank, not the same every step."""
    def draw(step: int, seed: int) -> dict:
        samples = make_samples()
        algorithm = {"loss": "clip_cov", "loss_agg": "token_mean", "loss_params": LossParamsConfig(**PARAMS)}
        learner = make_learner(monkeypatch, samples, algorithm, {"use_engine_logprobs": False}, 1, False, seed=seed)
        learner.update(samples, step, PhaseTimer())
        return {i: s.trainer.loss_selection.tolist() for i, s in enumerate(samples)}

    first = draw(3, 1234)
    assert draw(3, 1234) == first
    assert draw(4, 1234) != first and draw(3, 1235) != first
