"""Exact ties and edge cases of the newer losses and their token selection, each against a value written out
by hand: a token exactly on a trust-region bound stays in, zero advantages flag nothing, and the
selection's counts at their smallest sizes (the cases mutation testing looks for)."""
from __future__ import annotations

import pytest
import torch

from grpo_megatron.algorithms import LossParams, compute_policy_loss, select_tokens
from grpo_megatron.algorithms.is_weighted import _binary_kl

LOGP = torch.tensor([[-0.5, -1.0], [-2.0, -0.25]], dtype=torch.float64)
MASK = torch.ones(2, 2)


def loss_grad_metrics(logp, old, adv, variant, mask=MASK, **kwargs):
    logp = logp.clone().requires_grad_()
    loss, metrics = compute_policy_loss(logp, old, adv, mask, variant=variant, loss_agg="token_mean", **kwargs)
    return loss, torch.autograd.grad(loss, logp)[0], metrics


@pytest.mark.parametrize("variant", ["cispo", "dppo_tv", "dppo_kl", "gmpo"])
def test_on_policy_with_zero_width_bounds_nothing_is_clipped(variant):
    """r = 1 sits exactly on both bounds of a zero-width range: inside, so no flag (and for the token-level
    losses the full on-policy gradient -A / N)."""
    adv = torch.tensor([1.5, -0.5], dtype=torch.float64)
    loss, grad, metrics = loss_grad_metrics(LOGP, LOGP, adv, variant, clip_low=0.0, clip_high=0.0)
    assert metrics["clip_frac_tokens"].item() == 0.0
    if variant != "gmpo":
        torch.testing.assert_close(grad, -adv.unsqueeze(-1).expand(2, 2) / 4)


@pytest.mark.parametrize("direction", ["up", "down"])
def test_dppo_tokens_exactly_on_the_region_bound_stay_in(direction):
    """Every token's probability moves the same way, with the advantage that asks for that move; the bound is
    set to token (0, 0)'s own divergence: that token stays in, larger moves are masked."""
    old = torch.tensor([[-0.7, -1.2], [-2.5, -0.6]], dtype=torch.float64)
    logp, old = (LOGP, old) if direction == "up" else (old, LOGP)
    adv = torch.tensor([1.0, 1.0] if direction == "up" else [-1.0, -1.0], dtype=torch.float64)
    for variant, divergence in (("dppo_tv", (logp.exp() - old.exp()).abs()), ("dppo_kl", _binary_kl(old, logp))):
        bound = divergence[0, 0].item()
        clip = {"clip_low": 0.0, "clip_high": bound} if direction == "up" else {"clip_low": bound, "clip_high": 0.0}
        _, grad, _ = loss_grad_metrics(logp, old, adv, variant, **clip)
        out = divergence > bound
        assert out.any() and not out.all()
        torch.testing.assert_close(grad, torch.where(out, 0.0, -(logp - old).exp() * adv.unsqueeze(-1) / 4))


def test_gmpo_log_ratio_exactly_on_the_bound_is_not_flagged():
    old = LOGP - 0.25  # log r = 0.25 exactly
    _, _, metrics = loss_grad_metrics(LOGP, old, torch.tensor([1.0, 2.0], dtype=torch.float64), "gmpo",
                                      clip_low=0.25, clip_high=0.25)
    assert metrics["clip_frac_high"].item() == 0.0
    _, _, metrics = loss_grad_metrics(LOGP, LOGP + 0.25, torch.tensor([-1.0, -2.0], dtype=torch.float64), "gmpo",
                                      clip_low=0.25, clip_high=0.25)
    assert metrics["clip_frac_low"].item() == 0.0


@pytest.mark.parametrize("variant", ["dppo_tv", "dppo_kl", "gmpo"])
def test_zero_advantages_are_never_flagged(variant):
    """A = 0 has no update to bound, however far the ratio is."""
    zero = torch.zeros(2, dtype=torch.float64)
    for old in (LOGP - 1.5, LOGP + 0.6):  # probabilities far up, then down (log r = -0.5 .. -0.25)
        _, grad, metrics = loss_grad_metrics(LOGP, old.clamp(max=0.0), zero, variant)
        assert metrics["clip_frac_tokens"].item() == 0.0 and (grad == 0).all()


def test_binary_kl_of_log_probs_rounded_above_zero():
    """A log-prob a hair above 0 (rounding) reads as probability 1, not as a NaN."""
    above = torch.tensor([1e-7, -0.3], dtype=torch.float64)
    at = torch.tensor([0.0, -0.3], dtype=torch.float64)
    logp = torch.tensor([-0.1, 1e-7], dtype=torch.float64)
    torch.testing.assert_close(_binary_kl(above, logp), _binary_kl(at, logp.clamp(max=0.0)))
    assert torch.isfinite(_binary_kl(above, torch.tensor([-0.1, -0.2], dtype=torch.float64))).all()
    assert _binary_kl(torch.tensor([-0.5]), torch.tensor([0.0])).item() == float("inf")  # p = 1 > q


def test_covariance_exactly_on_the_band_edges_is_not_drawn():
    """Two one-token rows: centred log-probs and advantages +-1, so both covariances are exactly 1."""
    logp = torch.tensor([[0.0], [-2.0]], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    mask = torch.ones(2, 1)
    for lb, ub in ((1.0, 5.0), (0.0, 1.0)):
        params = LossParams(clip_cov_ratio=1.0, clip_cov_lb=lb, clip_cov_ub=ub)
        assert not select_tokens("clip_cov", logp, adv, mask, params).any()
    inside = LossParams(clip_cov_ratio=1.0, clip_cov_lb=0.5, clip_cov_ub=1.5)
    assert select_tokens("clip_cov", logp, adv, mask, inside).all()


def test_selections_of_one_token_and_with_the_default_ratio():
    one = torch.ones(1, 1)
    assert select_tokens("kl_cov", torch.tensor([[-1.0]]), torch.tensor([2.0]), one, LossParams()).all()
    logp = torch.tensor([[0.0], [-2.0], [-1.0]], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64)
    drawn = select_tokens("clip_cov", logp, adv, torch.ones(3, 1), LossParams(clip_cov_lb=0.5))
    assert drawn.sum() == 1 and not drawn[2]  # max(int(2e-4 * 3), 1) = 1 of the two in the band


@pytest.mark.parametrize("variant", ["cispo", "sapo", "gmpo", "clip_cov", "kl_cov", "dppo_tv", "dppo_kl"])
def test_all_masked_batch_gives_zero_loss_gradient_and_metrics(variant):
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    loss, grad, metrics = loss_grad_metrics(LOGP, LOGP - 0.3, adv, variant, mask=torch.zeros(2, 2))
    assert loss.item() == 0.0 and (grad == 0).all()
    assert all(float(value) == 0.0 for value in metrics.values())


def test_loss_params_accept_their_boundary_values():
    LossParams(sapo_tau_pos=0.5, sapo_tau_neg=0.5, clip_cov_ratio=1.0, kl_cov_ratio=1.0, kl_cov_coef=0.0).check()
    with pytest.raises(ValueError, match="sapo_tau_pos and sapo_tau_neg must be > 0"):
        LossParams(sapo_tau_pos=0.0).check()


def test_cispo_flags_count_the_truncated_weights_on_each_side():
    """clip_frac_low / high: tokens whose weight r was truncated at 1 - eps_low / 1 + eps_high, whatever A."""
    gen = torch.Generator().manual_seed(3)
    logp = -torch.rand(4, 6, generator=gen, dtype=torch.float64)
    old = logp + 0.3 * torch.randn(4, 6, generator=gen, dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, 0.5, 0.0], dtype=torch.float64)
    _, _, metrics = loss_grad_metrics(logp, old, adv, "cispo", mask=torch.ones(4, 6), clip_low=0.1, clip_high=0.15)
    ratio = (logp - old).exp()
    low, high = (ratio < 0.9).double().mean().item(), (ratio > 1.15).double().mean().item()
    assert low > 0 and high > 0
    assert metrics["clip_frac_low"].item() == pytest.approx(low) and metrics["clip_frac_high"].item() == pytest.approx(high)


def test_gmpo_flags_count_the_clipped_tokens_in_the_advantage_direction():
    """clip_frac_low: A < 0 and log r < -eps_low; clip_frac_high: A > 0 and log r > eps_high (per token)."""
    gen = torch.Generator().manual_seed(4)
    logp = -torch.rand(4, 6, generator=gen, dtype=torch.float64)
    old = logp + 0.5 * torch.randn(4, 6, generator=gen, dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=torch.float64)
    _, _, metrics = loss_grad_metrics(logp, old, adv, "gmpo", mask=torch.ones(4, 6), clip_low=0.2, clip_high=0.3)
    log_r, sign = logp - old, adv.unsqueeze(-1)
    low = ((sign < 0) & (log_r < -0.2)).double().mean().item()
    high = ((sign > 0) & (log_r > 0.3)).double().mean().item()
    assert low > 0 and high > 0 and ((sign > 0) & (log_r < -0.2)).any() and ((sign < 0) & (log_r > 0.3)).any()
    assert metrics["clip_frac_low"].item() == pytest.approx(low) and metrics["clip_frac_high"].item() == pytest.approx(high)


def test_gmpo_ratio_metrics_are_the_unclipped_geometric_means():
    """ratio_mean / min / max of gmpo: (prod_t r_t)^(1/|y_i|) over non-empty sequences, of any length."""
    gen = torch.Generator().manual_seed(5)
    logp = -torch.rand(3, 4, generator=gen, dtype=torch.float64)
    old = logp + 0.5 * torch.randn(3, 4, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    _, _, metrics = loss_grad_metrics(logp, old, torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64), "gmpo", mask=mask)
    means = [float((logp[i, :n] - old[i, :n]).mean().exp()) for i, n in enumerate((3, 4, 1))]
    assert metrics["ratio_mean"].item() == pytest.approx(sum(means) / 3)
    assert metrics["ratio_min"].item() == pytest.approx(min(means))
    assert metrics["ratio_max"].item() == pytest.approx(max(means))


@pytest.mark.parametrize("variant", ["clip_cov", "kl_cov"])
def test_one_token_batch_selects_its_token(variant):
    """max(int(r N), 1) = 1 of N = 1 (clip_cov: when it lies in the band): the whole batch, fraction 1."""
    logp = torch.tensor([[-0.5, 0.0]], dtype=torch.float64)
    params = LossParams(clip_cov_lb=-1.0)  # the lone token's covariance is 0
    _, _, metrics = loss_grad_metrics(logp, logp - 0.1, torch.tensor([1.0], dtype=torch.float64), variant,
                                      mask=torch.tensor([[1.0, 0.0]]), params=params)
    assert metrics["cov_selected_frac"].item() == 1.0


def test_loss_params_defaults_are_the_papers():
    """SAPO tau_pos 1.0 / tau_neg 1.05; Clip-Cov r 2e-4 in (1, 5); KL-Cov k 2e-4, beta 1."""
    assert LossParams() == LossParams(sapo_tau_pos=1.0, sapo_tau_neg=1.05, clip_cov_ratio=2e-4, clip_cov_lb=1.0,
                                      clip_cov_ub=5.0, kl_cov_ratio=2e-4, kl_cov_coef=1.0)


def test_covariance_of_a_lone_token_is_zero():
    """Centred on its own mean, one token's covariance is 0 whatever its log-prob and advantage."""
    from grpo_megatron.algorithms import covariance_scores
    scores = covariance_scores(torch.tensor([[-0.5, 3.0]]), torch.tensor([2.0]), torch.tensor([[1.0, 0.0]]))
    assert scores[0, 0].item() == 0.0
