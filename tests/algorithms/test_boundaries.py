"""Boundary values of the algorithms (the smallest valid sizes, the log-ratio bound, exact ties), each
against a value written out by hand: the cases mutation testing (scripts/mutation_test.py) found that
the other tests let through."""
from __future__ import annotations

import math

import pytest
import torch

from grpo_megatron.algorithms import (
    DAPO_CLIP, GSPO_PAPER_CLIP, MAX_LOG_RATIO, aggregate_loss, compute_policy_loss, dynamic_sampling_keep, estimate_kl,
    overlong_reward_penalty)


def test_log_ratios_are_bounded_at_twenty():
    """exp(|log r|) is capped at e^20 in the policy ratio and in k3, never beyond and never below."""
    assert MAX_LOG_RATIO == 20.0
    logp = torch.tensor([[100.0, -100.0, 19.5]], dtype=torch.float64)
    _, metrics = compute_policy_loss(logp, torch.zeros_like(logp), torch.ones(1), torch.ones_like(logp),
                                     variant="grpo", clip_low=0.2, clip_high=0.2, loss_agg="token_mean")
    assert float(metrics["ratio_max"]) == pytest.approx(math.exp(20.0), rel=1e-12)
    assert float(metrics["ratio_min"]) == pytest.approx(math.exp(-20.0), rel=1e-12)
    k3 = estimate_kl(torch.zeros(3, dtype=torch.float64), torch.tensor([100.0, -100.0, 19.5], dtype=torch.float64), "k3")
    expected = [math.exp(20.0) - 20.0 - 1, math.exp(-20.0) + 20.0 - 1, math.exp(19.5) - 19.5 - 1]
    assert k3.tolist() == pytest.approx(expected, rel=1e-12)


def test_sum_norm_accepts_a_max_length_of_one():
    """Dr. GRPO with L_max = 1: 1/G sum_i sum_t l_it / 1."""
    token_loss = torch.tensor([[0.5, 2.0], [4.0, 8.0]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    loss = aggregate_loss(token_loss, mask, "seq_mean_token_sum_norm", max_response_length=1)
    assert float(loss) == pytest.approx((0.5 + (4.0 + 8.0)) / 2 / 1)


def test_dynamic_sampling_with_groups_of_one_keeps_nothing():
    """A group of one sample has no reward spread (0 < correct < G fails for G = 1)."""
    keep = dynamic_sampling_keep(torch.tensor([0.0, 1.0, 0.5]), 1)
    assert keep.tolist() == [False, False, False]


def test_dynamic_sampling_refuses_groups_of_zero():
    with pytest.raises(ValueError, match="cannot be split into groups of 0"):
        dynamic_sampling_keep(torch.tensor([0.0, 1.0]), 0)


@pytest.mark.parametrize("max_length, cache_length, expected", [
    (4, 4, [0.0, -0.5, -1.0, -1.0]),  # the whole budget is the soft zone: -|y| / L_cache
    (4, 1, [0.0, 0.0, -1.0, -1.0]),  # a one-token soft zone
])
def test_overlong_penalty_at_the_extreme_cache_lengths(max_length, cache_length, expected):
    lengths = torch.tensor([0.0, 2.0, 4.0, 5.0]) if cache_length == max_length else torch.tensor([2.0, 3.0, 4.0, 5.0])
    assert overlong_reward_penalty(lengths, max_length, cache_length).tolist() == pytest.approx(expected)


def test_named_clip_ranges_are_the_papers_values():
    """DAPO clip-higher: eps_low 0.2, eps_high 0.28 ([0.8, 1.28]); GSPO paper: 3e-4, 4e-4."""
    assert DAPO_CLIP == (0.2, 0.28) and GSPO_PAPER_CLIP == (3e-4, 4e-4)


LOGP = torch.tensor([[-0.5, -1.0], [-2.0, -0.25], [-1.5, -3.0]], dtype=torch.float64)


def clip_fractions(variant: str, old: torch.Tensor, advantages: list[float], eps: float) -> tuple[float, float]:
    _, metrics = compute_policy_loss(LOGP, old, torch.tensor(advantages, dtype=torch.float64), torch.ones_like(LOGP),
                                     variant=variant, clip_low=eps, clip_high=eps, loss_agg="token_mean")
    return float(metrics["clip_frac_low"]), float(metrics["clip_frac_high"])


@pytest.mark.parametrize("variant", ["grpo", "gspo", "gspo_token"])
def test_ratios_on_the_clip_bound_are_not_clipped(variant):
    """On-policy, the ratio is exactly 1; with eps = 0 it sits on both bounds, where the clip does not cut
    the gradient."""
    assert clip_fractions(variant, LOGP, [1.0, -1.0, 1.0], eps=0.0) == (0.0, 0.0)
    assert clip_fractions(variant, LOGP, [1.0, -1.0, 1.0], eps=0.2) == (0.0, 0.0)


@pytest.mark.parametrize("variant", ["grpo", "gspo", "gspo_token"])
def test_zero_advantages_are_never_clipped(variant):
    """Ratios e^-1 and e are far outside [1 - eps, 1 + eps], but a zero advantage is neither positive nor
    negative."""
    assert clip_fractions(variant, LOGP + 1.0, [0.0, 0.0, 0.0], eps=0.2) == (0.0, 0.0)
    assert clip_fractions(variant, LOGP - 1.0, [0.0, 0.0, 0.0], eps=0.2) == (0.0, 0.0)


def test_dual_clip_bounds_the_loss_of_negative_advantages():
    """Ratios e^2 and e (A = -1, eps = 0.2, c = e): -min(wA, clip(w)A) = e^2 and e, bounded by -cA = e.
    The first is cut to e (its gradient too); the second sits exactly on the bound, which cuts nothing."""
    logp = torch.tensor([[2.0, 1.0]], dtype=torch.float64)
    loss, metrics = compute_policy_loss(logp, torch.zeros_like(logp), torch.full((1, 2), -1.0, dtype=torch.float64),
                                        torch.ones_like(logp), variant="grpo", clip_low=0.2, clip_high=0.2,
                                        loss_agg="token_mean", dual_clip_c=math.exp(1.0))
    assert float(loss) == pytest.approx((math.e + math.e) / 2, rel=1e-12)
    assert float(metrics["clip_frac_tokens"]) == 0.5


@pytest.mark.parametrize("variant", ["gspo", "gspo_token"])
def test_sequence_ratio_metrics_cover_every_non_empty_sequence(variant):
    """s_i = exp(mean_t log r_it) over each row's own tokens: a padded row counts, an empty one does not."""
    logp = torch.tensor([[0.2, 0.4, 0.6], [-0.3, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    _, metrics = compute_policy_loss(logp, torch.zeros_like(logp), torch.ones(3, dtype=torch.float64), mask,
                                     variant=variant, clip_low=0.2, clip_high=0.2, loss_agg="token_mean")
    ratios = [math.exp((0.2 + 0.4 + 0.6) / 3), math.exp(-0.3)]
    assert float(metrics["ratio_mean"]) == pytest.approx(sum(ratios) / 2, rel=1e-12)
    assert float(metrics["ratio_min"]) == pytest.approx(min(ratios), rel=1e-12)


@pytest.mark.parametrize("clip_low, clip_high", [(-0.5, 0.2), (0.2, -0.5)])
def test_negative_clip_bounds_are_refused(clip_low, clip_high):
    logp = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="clip_low and clip_high must be >= 0"):
        compute_policy_loss(logp, logp, torch.zeros(1), torch.ones_like(logp), variant="grpo", clip_low=clip_low,
                            clip_high=clip_high, loss_agg="token_mean")


def test_metrics_of_a_single_response_token_are_its_own_values():
    logp = torch.tensor([[0.3, 9.0]], dtype=torch.float64)
    _, metrics = compute_policy_loss(logp, torch.zeros_like(logp), torch.ones(1, dtype=torch.float64),
                                     torch.tensor([[1.0, 0.0]], dtype=torch.float64), variant="grpo", clip_low=0.2,
                                     clip_high=0.2, loss_agg="token_mean")
    assert float(metrics["ratio_mean"]) == pytest.approx(math.exp(0.3), rel=1e-12)
    assert float(metrics["clip_frac_high"]) == 1.0  # e^0.3 > 1.2 with A > 0


def test_an_unknown_loss_aggregation_is_named_before_any_shape_error():
    """Names are checked first: a typo in loss_agg is reported as such, not as gspo's advantage shape."""
    logp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="unknown loss aggregation 'mean'"):
        compute_policy_loss(logp, logp, torch.zeros(2, 3), torch.ones_like(logp), variant="gspo", clip_low=0.2,
                            clip_high=0.2, loss_agg="mean")


@pytest.mark.parametrize("kl_coef", [0.0, 1.0])
def test_kl_term_is_in_the_loss_exactly_when_its_coefficient_is_not_zero(kl_coef):
    """On-policy GRPO with A = 0 has pg_loss 0, so loss = kl_coef * mean_t k1 = kl_coef * mean_t (logp - ref)."""
    logp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    ref = torch.tensor([[-1.5, -1.0]], dtype=torch.float64)
    loss, metrics = compute_policy_loss(logp, logp, torch.zeros(1, dtype=torch.float64), torch.ones_like(logp),
                                        variant="grpo", clip_low=0.2, clip_high=0.2, loss_agg="token_mean",
                                        ref_logprobs=ref, kl_coef=kl_coef, kl_estimator="k1")
    k1 = ((-1.0 - -1.5) + (-2.0 - -1.0)) / 2
    assert float(loss) == pytest.approx(kl_coef * k1, abs=1e-15)
    assert float(metrics["kl_loss"]) == pytest.approx(k1 if kl_coef else 0.0, abs=1e-15)
    assert float(metrics["kl_ref"]) == pytest.approx(k1, abs=1e-15)
