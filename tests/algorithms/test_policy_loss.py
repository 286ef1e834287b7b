"""Policy losses against the loop reference: values, gradients, padding, edge cases, metrics, gradcheck."""
from __future__ import annotations

import itertools

import pytest
import torch

from grpo_megatron.algorithms import compute_policy_loss, loss_normalizer
from tests.algorithms import reference

VARIANTS = ("grpo", "gspo", "gspo_token")
LOSS_AGGS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
MAX_LEN = 9


def make_batch(seed: int, batch: int = 5, length: int = 7, spread: float = 0.3, per_token_adv: bool = False):
    """Random float64 batch with right padding, one all-masked row and one length-1 response."""
    gen = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(batch, length, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    old = logp.detach() + spread * torch.randn(batch, length, generator=gen, dtype=torch.float64)
    ref = logp.detach() + spread * torch.randn(batch, length, generator=gen, dtype=torch.float64)
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    lengths[0], lengths[1] = 0, 1
    mask = (torch.arange(length) < lengths.unsqueeze(-1)).float()
    shape = (batch, length) if per_token_adv else (batch,)
    adv = torch.randn(shape, generator=gen, dtype=torch.float64)
    return logp, old, ref, adv, mask


def both_losses(logp, old, ref, adv, mask, variant, loss_agg, **kwargs):
    clip_low, clip_high = kwargs.pop("clip", (0.1, 0.15))
    kl_coef, kl_estimator, dual_c = kwargs.get("kl_coef", 0.0), kwargs.get("kl_estimator", "k3"), kwargs.get("dual_clip_c")
    ours, metrics = compute_policy_loss(
        logp, old, adv, mask, variant=variant, clip_low=clip_low, clip_high=clip_high, loss_agg=loss_agg,
        ref_logprobs=ref, max_response_length=MAX_LEN, **kwargs,
    )
    expected = reference.policy_loss(logp, old, adv, mask, variant, clip_low, clip_high, loss_agg, ref,
                                     kl_coef, kl_estimator, dual_c, MAX_LEN)
    return ours, expected, metrics


@pytest.mark.parametrize("variant,loss_agg", itertools.product(VARIANTS, LOSS_AGGS))
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference_value_and_gradient(variant, loss_agg, seed):
    logp, old, ref, adv, mask = make_batch(seed)
    for kwargs in ({}, {"kl_coef": 0.05, "kl_estimator": "k3"}, {"dual_clip_c": 1.5, "clip": (0.05, 0.3)}):
        ours, expected, _ = both_losses(logp, old, ref, adv, mask, variant, loss_agg, **dict(kwargs))
        grad_ours, = torch.autograd.grad(ours, logp)
        grad_expected, = torch.autograd.grad(expected, logp)
        torch.testing.assert_close(ours, expected)
        torch.testing.assert_close(grad_ours, grad_expected)


@pytest.mark.parametrize("variant", ["grpo", "gspo_token"])
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_per_token_advantages_and_kl_estimators(variant, estimator):
    logp, old, ref, adv, mask = make_batch(3, per_token_adv=True)
    ours, expected, _ = both_losses(logp, old, ref, adv, mask, variant, "token_mean", kl_coef=0.2, kl_estimator=estimator)
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(torch.autograd.grad(ours, logp)[0], torch.autograd.grad(expected, logp)[0])


def test_clipping_happens_in_these_tests():
    """Guard against a reference comparison that never leaves the clip range."""
    logp, old, ref, adv, mask = make_batch(0)
    for variant in VARIANTS:
        _, _, metrics = both_losses(logp, old, ref, adv, mask, variant, "token_mean", clip=(0.01, 0.01))
        assert 0 < metrics["clip_frac_tokens"] < 1


@pytest.mark.parametrize("variant", VARIANTS)
def test_extreme_ratios_and_garbage_padding_stay_finite(variant):
    logp, old, ref, adv, mask = make_batch(4, spread=0.0)
    adv[0] = float("nan")  # row 0 is all padding
    old = old + torch.tensor([0.0, 1000.0, -1000.0, 80.0, -80.0], dtype=torch.float64).unsqueeze(-1)
    garbage = torch.tensor([float("nan"), float("inf"), float("-inf")], dtype=torch.float64).repeat(12)[: mask.numel()]
    padding = ~mask.bool()
    old = torch.where(padding, garbage.view_as(mask), old)
    ref = torch.where(padding, garbage.view_as(mask), ref)
    for clip, dual in (((0.2, 0.28), None), ((0.2, 0.28), 3.0), ((float("inf"), float("inf")), None)):
        logp_in = torch.where(padding, garbage.view_as(mask), logp)
        loss, metrics = compute_policy_loss(
            logp_in, old, adv, mask, variant=variant, clip_low=clip[0], clip_high=clip[1], loss_agg="token_mean",
            ref_logprobs=ref, kl_coef=0.1, dual_clip_c=dual, entropy=torch.where(padding, float("nan"), 1.0),
        )
        grad, = torch.autograd.grad(loss, logp)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert all(torch.isfinite(torch.as_tensor(value)) for value in metrics.values())


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_all_masked_batch_gives_zero_loss_and_gradient(variant, loss_agg):
    logp, old, ref, adv, mask = make_batch(5)
    loss, metrics = compute_policy_loss(
        logp, old, adv, torch.zeros_like(mask), variant=variant, clip_low=0.2, clip_high=0.2, loss_agg=loss_agg,
        ref_logprobs=ref, kl_coef=0.1, max_response_length=MAX_LEN,
    )
    assert loss.item() == 0.0
    assert torch.autograd.grad(loss, logp)[0].abs().sum().item() == 0.0
    assert all(float(value) == 0.0 for value in metrics.values())


def test_metrics_against_direct_counts():
    logp, old, ref, adv, mask = make_batch(6, spread=0.5)
    entropy = torch.rand_like(logp)
    clip_low, clip_high = 0.1, 0.2
    _, metrics = compute_policy_loss(logp, old, adv, mask, variant="grpo", clip_low=clip_low, clip_high=clip_high,
                                     loss_agg="token_mean", ref_logprobs=ref, kl_coef=0.1, entropy=entropy)
    low = high = tokens = seqs = clipped_seqs = 0
    ratios, kl_old, kl_ref, ent = [], [], [], []
    for i in range(logp.shape[0]):
        positions = [t for t in range(logp.shape[1]) if mask[i, t]]
        seqs += bool(positions)
        any_clipped = False
        for t in positions:
            tokens += 1
            ratio = torch.exp(logp[i, t] - old[i, t]).item()
            ratios.append(ratio)
            low += adv[i] < 0 and ratio < 1 - clip_low
            high += adv[i] > 0 and ratio > 1 + clip_high
            any_clipped |= (adv[i] < 0 and ratio < 1 - clip_low) or (adv[i] > 0 and ratio > 1 + clip_high)
            kl_old.append(reference.kl_term(old[i, t], logp[i, t], "k3").item())
            kl_ref.append(reference.kl_term(logp[i, t], ref[i, t], "k3").item())
            ent.append(entropy[i, t].item())
        clipped_seqs += any_clipped
    expected = {
        "clip_frac_tokens": (low + high) / tokens, "clip_frac_seqs": clipped_seqs / seqs,
        "clip_frac_low": low / tokens, "clip_frac_high": high / tokens,
        "ratio_mean": sum(ratios) / tokens, "ratio_min": min(ratios), "ratio_max": max(ratios),
        "approx_kl_old": sum(kl_old) / tokens, "kl_ref": sum(kl_ref) / tokens, "entropy": sum(ent) / tokens,
    }
    assert low > 0 and high > 0
    for key, value in expected.items():
        assert metrics[key].item() == pytest.approx(float(value)), key
    assert set(metrics) == set(expected) | {"pg_loss", "kl_loss"}
    assert all(value.dim() == 0 and not value.requires_grad for value in metrics.values())


def test_gspo_clip_fractions_are_sequence_level():
    logp, old, ref, adv, mask = make_batch(7, spread=0.5)
    _, metrics = compute_policy_loss(logp, old, adv, mask, variant="gspo", clip_low=3e-4, clip_high=4e-4,
                                     loss_agg="seq_mean_token_mean")
    clipped_tokens, clipped_seqs, seqs, ratios = 0, 0, 0, []
    for i in range(logp.shape[0]):
        positions = [t for t in range(logp.shape[1]) if mask[i, t]]
        if not positions:
            continue
        seqs += 1
        s_i = torch.exp(sum(logp[i, t] - old[i, t] for t in positions) / len(positions)).item()
        ratios.append(s_i)
        clipped = (adv[i] > 0 and s_i > 1 + 4e-4) or (adv[i] < 0 and s_i < 1 - 3e-4)
        clipped_seqs += clipped
        clipped_tokens += clipped * len(positions)
    assert metrics["clip_frac_seqs"].item() == pytest.approx(clipped_seqs / seqs)
    assert metrics["clip_frac_tokens"].item() == pytest.approx(clipped_tokens / mask.sum().item())
    assert metrics["ratio_mean"].item() == pytest.approx(sum(ratios) / len(ratios))
    assert metrics["ratio_max"].item() == pytest.approx(max(ratios))


def test_kl_disabled_needs_no_reference_and_reports_zero():
    logp, old, _, adv, mask = make_batch(8)
    loss, metrics = compute_policy_loss(logp, old, adv, mask, variant="grpo", clip_low=0.2, clip_high=0.28,
                                        loss_agg="token_mean")
    assert "kl_ref" not in metrics and metrics["kl_loss"].item() == 0.0
    assert loss.item() == metrics["pg_loss"].item()


def test_external_normalizer_is_the_batch_count():
    logp, old, ref, adv, mask = make_batch(9)
    for loss_agg in LOSS_AGGS:
        kwargs = dict(variant="grpo", clip_low=0.2, clip_high=0.2, loss_agg=loss_agg, max_response_length=MAX_LEN)
        own, _ = compute_policy_loss(logp, old, adv, mask, **kwargs)
        normalizer = loss_normalizer(mask, loss_agg, MAX_LEN)
        given, _ = compute_policy_loss(logp, old, adv, mask, normalizer=normalizer, **kwargs)
        as_tensor, _ = compute_policy_loss(logp, old, adv, mask, normalizer=torch.tensor(normalizer), **kwargs)
        torch.testing.assert_close(own, given)
        torch.testing.assert_close(own, as_tensor)
    assert loss_normalizer(mask, "token_mean") == mask.sum().item()
    assert loss_normalizer(mask, "seq_mean_token_mean") == 4  # row 0 is empty
    assert loss_normalizer(mask, "seq_mean_token_sum_norm", MAX_LEN) == 4 * MAX_LEN


@pytest.mark.parametrize("variant,per_token_adv", [("grpo", True), ("gspo", False), ("gspo_token", False)])
def test_gradcheck(variant, per_token_adv):
    """Finite differences of the loss value. GSPO-token only with per-sequence advantages: with
    per-token ones its stop-gradient makes the gradient (checked against the reference above)
    differ, by design, from the derivative of its value."""
    logp, old, ref, adv, mask = make_batch(10, batch=4, length=4, per_token_adv=per_token_adv)

    def loss_fn(logp):
        return compute_policy_loss(logp, old, adv, mask, variant=variant, clip_low=0.1, clip_high=0.2,
                                   loss_agg="seq_mean_token_mean", ref_logprobs=ref, kl_coef=0.1, dual_clip_c=2.0)[0]

    assert torch.autograd.gradcheck(loss_fn, (logp,))
