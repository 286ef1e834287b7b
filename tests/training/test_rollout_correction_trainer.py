"""Mismatch correction inside the trainer: independent of the micro-batch split, dropped tokens out of
the normaliser, the old-log-prob pass forced, config errors that name the fix."""
import math
from dataclasses import replace

import pytest
import torch

from grpo_megatron.config import ConfigError
from grpo_megatron.training.loop import Trainer
from grpo_megatron.training import learner as learner_module
from grpo_megatron.training.metrics import PhaseTimer
from tests.training.test_loop import VARIED, policy_weights

CORRECTION = {"mode": "mis", "level": "token", "low": 0.8, "high": 1.25, "veto": 0.5, "max_seq_kl": 0.1}


def perturbed_rollout(trainer, sigma=0.4):
    """The step's samples with the engine's log-probs moved by fixed noise: a real train-rollout mismatch
    (as a bf16 or fp8 engine would give), the same for every trainer built with the same seed."""
    batch, _ = trainer.rollouts.rollout_now(trainer.step)
    g = torch.Generator().manual_seed(0)
    noisy = [(torch.tensor(s.engine_logprobs) + sigma * torch.randn(len(s.engine_logprobs), generator=g)).clamp(max=0.0)
             for s in batch]
    return [replace(s, engine_logprobs=values.tolist()) for s, values in zip(batch, noisy)]


def run_step(make_config, train, correction=CORRECTION, capture=None, monkeypatch=None):
    trainer = Trainer(make_config(train={"steps": 1, **train}, reward=VARIED,
                                  algorithm={"loss": "grpo", "clip_low": 0.2, "clip_high": 0.28,
                                             "loss_agg": "token_mean", "kl_coef": 0.01,
                                             "rollout_correction": correction}))
    if capture is not None:  # each mini-batch's loss normaliser, as the learner hands it to the loss
        original = learner_module.policy_loss_fn
        monkeypatch.setattr(learner_module, "policy_loss_fn", lambda alg, max_len, normalizer, *args: (
            capture.append(normalizer), original(alg, max_len, normalizer, *args))[1])
    batch = perturbed_rollout(trainer)
    metrics = trainer.learner.update(batch, trainer.step, PhaseTimer())
    weights = policy_weights(trainer)
    trainer.close()
    return batch, metrics, weights


def test_corrected_step_does_not_depend_on_the_micro_batch_split(make_config, dist_world1):
    _, two, weights_two = run_step(make_config, {"micro_batch_size": 2})
    batch, four, weights_four = run_step(make_config, {"micro_batch_size": 4})
    assert 0 < four["rollout_correction/frac_masked"] < 0.9 and four["rollout_correction/frac_rejected"] > 0
    for key in ("train/pg_loss", "train/kl_loss", "train/grad_norm", "train/entropy",
                *[k for k in four if k.startswith("rollout_correction/")]):
        assert two[key] == pytest.approx(four[key], rel=1e-5, abs=1e-9), key
    for name in weights_four:
        torch.testing.assert_close(weights_two[name], weights_four[name], rtol=1e-5, atol=1e-7)
    for key, value in four.items():
        assert math.isfinite(value), key


def test_dropped_tokens_leave_the_normaliser(make_config, dist_world1, monkeypatch):
    normalizers = []
    batch, metrics, _ = run_step(make_config, {"num_minibatches": 2}, capture=normalizers, monkeypatch=monkeypatch,
                                 correction={"mode": "mis", "low": 0.8, "high": 1.25})
    half = len(batch) // 2
    kept = [sum(int((s.trainer.rollout_weights > 0).sum()) for s in part) for part in (batch[:half], batch[half:])]
    total = [sum(len(s.response_ids) for s in part) for part in (batch[:half], batch[half:])]
    assert normalizers == kept and sum(kept) < sum(total)
    assert 1 - sum(kept) / sum(total) == pytest.approx(metrics["rollout_correction/frac_masked"], abs=1e-9)


def test_correction_forces_the_old_logprob_pass_and_tis_keeps_every_token(make_config, dist_world1):
    batch, metrics, _ = run_step(make_config, {"num_minibatches": 1},
                                 correction={"mode": "tis", "level": "sequence", "high": 1.5})
    assert all(s.trainer.old_logprobs is not None and s.trainer.rollout_weights is not None for s in batch)
    assert all(bool((s.trainer.rollout_weights > 0).all()) and float(s.trainer.rollout_weights.max()) <= 1.5
               for s in batch)
    assert metrics["rollout_correction/frac_masked"] == 0 and metrics["rollout_correction/weight_max"] <= 1.5
    assert metrics["rollout_correction/frac_truncated"] > 0 and metrics["rollout_correction/bound"] == 1.5


def test_adaptive_bound_reaches_the_ess_target(make_config, dist_world1):
    _, metrics, _ = run_step(make_config, {}, correction={"mode": "tis", "high": 5.0, "adaptive_ess_target": 0.95})
    assert 1.0 <= metrics["rollout_correction/bound"] < 5.0
    assert metrics["rollout_correction/ess"] >= 0.95 > metrics["rollout_correction/ess_raw"]


def test_metrics_without_correction_and_no_weights(make_config, dist_world1):
    batch, metrics, _ = run_step(make_config, {"num_minibatches": 2}, correction={"mode": "none"})
    assert all(s.trainer.rollout_weights is None for s in batch)
    assert metrics["rollout_correction/chi2_token"] > 0 and metrics["rollout_correction/ess_raw"] < 1
    assert "rollout_correction/frac_masked" not in metrics


@pytest.mark.parametrize("rollout, correction, match", [
    ({"use_engine_logprobs": True}, {"mode": "tis"}, "use_engine_logprobs"),
    ({}, {"mode": "typo"}, "mode='typo': use none, mis, reject, tis"),
    ({}, {"mode": "tis", "level": "seq"}, "level='seq'"),
    ({}, {"mode": "mis", "low": 1.5, "high": 2.0}, "0 <= low <= 1 <= high"),
    ({}, {"mode": "tis", "veto": 2.0}, "veto=2.0"),
    ({}, {"mode": "mis", "adaptive_ess_target": 0.9}, "needs mode tis"),
    ({}, {"veto": 1e-4}, "act only with a mode"),
])
def test_config_errors_name_the_fix(make_config, rollout, correction, match):
    with pytest.raises(ConfigError, match=match):
        make_config(rollout=rollout, algorithm={"rollout_correction": correction})
