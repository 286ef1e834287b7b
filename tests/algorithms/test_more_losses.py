"""CISPO, SAPO, GMPO, Clip-Cov, KL-Cov and DPPO-TV/KL against loop references of their papers' formulas
(float64, value and gradient), their token selection, and finite-difference gradients."""
from __future__ import annotations

import itertools

import pytest
import torch

from grpo_megatron.algorithms import LossParams, compute_policy_loss, covariance_scores, select_tokens
from tests.algorithms import reference_losses as reference
from tests.algorithms import test_policy_loss
from tests.algorithms.test_policy_loss import MAX_LEN

NEW_LOSSES = ("cispo", "sapo", "gmpo", "clip_cov", "kl_cov", "dppo_tv", "dppo_kl")
LOSS_AGGS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
PAPER_CLIP = {"cispo": (1.0, 0.2), "gmpo": (0.4, 0.4), "clip_cov": (0.2, 0.2), "dppo_tv": (0.15, 0.15),
              "dppo_kl": (0.05, 0.05)}
OTHER_CLIP = {"cispo": (0.1, 0.15), "gmpo": (0.1, 0.2), "clip_cov": (0.05, 0.3), "dppo_tv": (0.02, 0.05),
              "dppo_kl": (0.002, 0.004)}
TEST_PARAMS = LossParams(sapo_tau_pos=2.0, sapo_tau_neg=3.0, clip_cov_ratio=0.3, clip_cov_lb=0.05, clip_cov_ub=2.0,
                         kl_cov_ratio=0.25, kl_cov_coef=0.7)
"""Selections of a quarter of the tokens or so (the papers' 2e-4 selects one token of these small batches)."""


def make_batch(seed: int, **kwargs):
    """test_policy_loss's batch with old and reference log-probs <= 0, as log-probs are (DPPO's binary
    divergences read them as probabilities)."""
    logp, old, ref, adv, mask = test_policy_loss.make_batch(seed, **kwargs)
    return logp, old.clamp(max=0.0), ref.clamp(max=0.0), adv, mask


def selection_for(variant, logp, old, adv, mask, seed=0):
    if variant not in ("clip_cov", "kl_cov"):
        return None
    return select_tokens(variant, old, adv, mask, TEST_PARAMS, torch.Generator().manual_seed(seed))


def both_losses(logp, old, ref, adv, mask, variant, loss_agg, clip, params=TEST_PARAMS, kl_coef=0.0):
    selection = selection_for(variant, logp, old, adv, mask)
    kwargs = {} if clip is None else {"clip_low": clip[0], "clip_high": clip[1]}
    ours, metrics = compute_policy_loss(logp, old, adv, mask, variant=variant, loss_agg=loss_agg, ref_logprobs=ref,
                                        kl_coef=kl_coef, max_response_length=MAX_LEN, params=params,
                                        token_selection=selection, **kwargs)
    expected = reference.policy_loss(logp, old, adv, mask, variant, clip or PAPER_CLIP.get(variant), params, loss_agg,
                                     selection, ref, kl_coef, MAX_LEN)
    return ours, expected, metrics


@pytest.mark.parametrize("variant,loss_agg", itertools.product(NEW_LOSSES, LOSS_AGGS))
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference_value_and_gradient(variant, loss_agg, seed):
    logp, old, ref, adv, mask = make_batch(seed)
    clips = [None] if variant in ("sapo", "kl_cov") else [None, OTHER_CLIP[variant]]
    for clip, kl_coef in itertools.product(clips, (0.0, 0.05)):
        ours, expected, _ = both_losses(logp, old, ref, adv, mask, variant, loss_agg,
                                        None if clip is None else clip, kl_coef=kl_coef)
        if clip is None and variant in PAPER_CLIP:  # the reference gets the paper's clip explicitly
            expected = reference.policy_loss(logp, old, adv, mask, variant, PAPER_CLIP[variant], TEST_PARAMS, loss_agg,
                                             selection_for(variant, logp, old, adv, mask), ref, kl_coef, MAX_LEN)
        torch.testing.assert_close(ours, expected)
        torch.testing.assert_close(torch.autograd.grad(ours, logp)[0], torch.autograd.grad(expected, logp)[0])


@pytest.mark.parametrize("variant", ["cispo", "sapo", "clip_cov", "kl_cov", "dppo_tv", "dppo_kl"])
def test_per_token_advantages(variant):
    logp, old, ref, adv, mask = make_batch(3, per_token_adv=True)
    ours, expected, _ = both_losses(logp, old, ref, adv, mask, variant, "token_mean", OTHER_CLIP.get(variant))
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(torch.autograd.grad(ours, logp)[0], torch.autograd.grad(expected, logp)[0])


def test_paper_defaults_are_the_registered_ones():
    logp, old, ref, adv, mask = make_batch(2)
    for variant in NEW_LOSSES:
        default, _ = compute_policy_loss(logp, old, adv, mask, variant=variant, loss_agg="token_mean",
                                         token_selection=selection_for(variant, logp, old, adv, mask))
        explicit, _ = compute_policy_loss(logp, old, adv, mask, variant=variant, loss_agg="token_mean",
                                          params=LossParams(1.0, 1.05, 2e-4, 1.0, 5.0, 2e-4, 1.0),
                                          token_selection=selection_for(variant, logp, old, adv, mask),
                                          **dict(zip(("clip_low", "clip_high"), PAPER_CLIP.get(variant, ()))))
        assert default.item() == explicit.item(), variant


@pytest.mark.parametrize("variant", ["cispo", "gmpo", "clip_cov", "dppo_tv", "dppo_kl"])
def test_the_bound_acts_in_these_tests(variant):
    """Guard against a reference comparison that never leaves the trust region: some tokens but not all
    are clipped / masked, with the paper's range and with the other one."""
    logp, old, ref, adv, mask = make_batch(0)
    for clip in (None, OTHER_CLIP[variant]):
        _, _, metrics = both_losses(logp, old, ref, adv, mask, variant, "token_mean", clip)
        assert 0 < metrics["clip_frac_tokens"] < 1, (variant, clip)


def test_sapo_gate_is_one_on_policy_and_decays_off_policy():
    """On-policy the SAPO gradient is the plain policy gradient -A grad log pi / N; off-policy each token's
    weight is 4 s (1 - s) r < r, s = sigmoid(tau (r - 1))."""
    logp, old, ref, adv, mask = make_batch(4, per_token_adv=True)
    loss, _ = compute_policy_loss(logp, logp.detach(), adv, mask, variant="sapo", loss_agg="token_mean")
    grad, = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, -adv * mask / mask.sum())
    loss, _ = compute_policy_loss(logp, old, adv, mask, variant="sapo", loss_agg="token_mean")
    grad, = torch.autograd.grad(loss, logp)
    ratio = torch.exp(logp.detach() - old)
    tau = torch.where(adv > 0, 1.0, 1.05).double()
    s = torch.sigmoid(tau * (ratio - 1))
    torch.testing.assert_close(grad, -4 * s * (1 - s) * ratio * adv * mask / mask.sum())


def test_cispo_keeps_a_gradient_where_ppo_clips():
    """Tokens PPO's clip cuts keep CISPO's gradient, weighted by the truncated ratio."""
    logp, old, ref, adv, mask = make_batch(5, spread=0.8)
    loss, metrics = compute_policy_loss(logp, old, adv, mask, variant="cispo", loss_agg="token_mean")
    grad, = torch.autograd.grad(loss, logp)
    weight = torch.exp(logp.detach() - old).clamp(0.0, 1.2)
    torch.testing.assert_close(grad, -weight * adv.unsqueeze(-1) * mask / mask.sum())
    assert metrics["clip_frac_high"] > 0 and (grad[mask.bool()] != 0).all()


def test_covariance_scores_and_kl_cov_selection_against_loops():
    logp, old, ref, adv, mask = make_batch(6)
    expected = reference.covariances(old, adv, mask)
    scores = covariance_scores(old, adv, mask)
    for (i, t), value in expected.items():
        assert scores[i, t].item() == pytest.approx(value)
    selected = select_tokens("kl_cov", old, adv, mask, TEST_PARAMS)
    count = max(int(TEST_PARAMS.kl_cov_ratio * len(expected)), 1)
    largest = sorted(expected, key=expected.get, reverse=True)[:count]
    assert {tuple(x) for x in selected.nonzero().tolist()} == set(largest)


def test_clip_cov_selection_draws_within_the_band():
    logp, old, ref, adv, mask = make_batch(7)
    cov = reference.covariances(old, adv, mask)
    band = {k for k, v in cov.items() if TEST_PARAMS.clip_cov_lb < v < TEST_PARAMS.clip_cov_ub}
    count = max(int(TEST_PARAMS.clip_cov_ratio * len(cov)), 1)
    assert len(band) > count > 1  # a draw, not the whole band
    seen = set()
    for seed in range(40):
        chosen = {tuple(x) for x in select_tokens("clip_cov", old, adv, mask, TEST_PARAMS,
                                                  torch.Generator().manual_seed(seed)).nonzero().tolist()}
        assert len(chosen) == count and chosen <= band
        seen |= chosen
    assert seen == band  # every token of the band is drawn sometimes
    narrow = LossParams(clip_cov_ratio=1.0, clip_cov_lb=TEST_PARAMS.clip_cov_lb, clip_cov_ub=TEST_PARAMS.clip_cov_ub)
    assert {tuple(x) for x in select_tokens("clip_cov", old, adv, mask, narrow).nonzero().tolist()} == band


def test_selection_of_an_empty_batch_and_default_ratio():
    logp, old, ref, adv, mask = make_batch(8)
    for variant in ("clip_cov", "kl_cov"):
        assert not select_tokens(variant, old, adv, torch.zeros_like(mask), LossParams()).any()
    assert select_tokens("kl_cov", old, adv, mask, LossParams()).sum() == 1  # max(int(2e-4 N), 1)


def test_without_a_given_selection_the_batch_selects_from_its_own_logprobs():
    logp, old, ref, adv, mask = make_batch(9)
    own, metrics = compute_policy_loss(logp, old, adv, mask, variant="kl_cov", loss_agg="token_mean", params=TEST_PARAMS)
    given, _ = compute_policy_loss(logp, old, adv, mask, variant="kl_cov", loss_agg="token_mean", params=TEST_PARAMS,
                                   token_selection=select_tokens("kl_cov", logp.detach(), adv, mask, TEST_PARAMS))
    assert own.item() == given.item()
    assert metrics["cov_selected_frac"].item() == pytest.approx(int(0.25 * mask.sum().item()) / mask.sum().item())


@pytest.mark.parametrize("variant", ["sapo", "gmpo", "clip_cov", "kl_cov", "dppo_tv", "dppo_kl"])
def test_gradcheck(variant):
    """Finite differences of the loss value (CISPO's stop-gradient makes its gradient differ, by design,
    from the derivative of its value: checked against the reference above)."""
    logp, old, ref, adv, mask = make_batch(10, batch=4, length=4)
    selection = selection_for(variant, logp, old, adv, mask)

    def loss_fn(logp):
        return compute_policy_loss(logp, old, adv, mask, variant=variant, loss_agg="seq_mean_token_mean",
                                   ref_logprobs=ref, kl_coef=0.1, params=TEST_PARAMS, token_selection=selection)[0]

    assert torch.autograd.gradcheck(loss_fn, (logp,))


@pytest.mark.parametrize("variant", NEW_LOSSES)
def test_extreme_ratios_and_garbage_padding_stay_finite(variant):
    logp, old, ref, adv, mask = make_batch(4, spread=0.0)
    adv[0] = float("nan")  # row 0 is all padding
    old = old + torch.tensor([0.0, 1000.0, -1000.0, 80.0, -80.0], dtype=torch.float64).unsqueeze(-1)
    garbage = torch.tensor([float("nan"), float("inf"), float("-inf")], dtype=torch.float64).repeat(12)[: mask.numel()]
    padding = ~mask.bool()
    old = torch.where(padding, garbage.view_as(mask), old)
    loss, metrics = compute_policy_loss(torch.where(padding, garbage.view_as(mask), logp), old, adv, mask,
                                        variant=variant, loss_agg="token_mean", params=TEST_PARAMS)
    grad, = torch.autograd.grad(loss, logp)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert all(torch.isfinite(torch.as_tensor(value)) for value in metrics.values())
