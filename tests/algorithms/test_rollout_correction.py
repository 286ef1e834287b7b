"""Rollout (train-inference mismatch) correction against hand-written references: weights, masks,
rejection, the adaptive bound, and the policy loss with weights (values and autograd gradients)."""
import itertools
import math

import pytest
import torch

from grpo_megatron.algorithms import (
    ROLLOUT_CORRECTIONS, ROLLOUT_IS_LEVELS, adaptive_truncation_bound, compute_policy_loss,
    compute_rollout_correction, effective_sample_size, loss_normalizer, pass_at_k)
from grpo_megatron.training.mismatch import rollout_correction_metrics

LEVELS = ("token", "sequence", "geometric")


def batch(seed=0, B=4, T=6, spread=0.5):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    rollout = old + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T)
    mask[1, 4:] = 0
    mask[2, 1:] = 0
    mask[3] = 0  # an empty row
    return old, rollout, mask


def reference_weights(old, rollout, mask, mode, level, low, high, veto=None, max_seq_kl=None):
    """Loop-by-loop reference: (weights, keep) as nested lists."""
    B, T = old.shape
    weights = [[0.0] * T for _ in range(B)]
    keep = [[False] * T for _ in range(B)]
    for i in range(B):
        tokens = [t for t in range(T) if mask[i, t]]
        log_rho = {t: float(old[i, t] - rollout[i, t]) for t in tokens}
        if veto is not None and any(math.exp(v) < veto for v in log_rho.values()):
            continue
        if max_seq_kl is not None and tokens:
            k3 = [math.exp(v) - v - 1 for v in log_rho.values()]
            if sum(k3) / len(k3) > max_seq_kl:
                continue
        for t in tokens:
            if level == "token":
                w = math.exp(log_rho[t])
            elif level == "sequence":
                w = math.exp(sum(log_rho.values()))
            else:
                w = math.exp(sum(log_rho.values()) / len(tokens))
            if mode == "tis":
                weights[i][t], keep[i][t] = min(w, high), True
            elif low <= w <= high:
                weights[i][t], keep[i][t] = (w if mode == "mis" else 1.0), True
    return torch.tensor(weights, dtype=old.dtype), torch.tensor(keep)


@pytest.mark.parametrize("mode, level", itertools.product(("tis", "mis", "reject"), LEVELS))
def test_weights_and_keep_match_the_reference(mode, level):
    old, rollout, mask = batch(spread=0.6)
    low, high = (0.0, 1.5) if mode == "tis" else (0.6, 1.6)
    got = compute_rollout_correction(old, rollout, mask, mode=mode, level=level, low=low, high=high)
    weights, keep = reference_weights(old, rollout, mask, mode, level, low, high)
    torch.testing.assert_close(got.weights, weights, rtol=1e-12, atol=1e-12)
    assert torch.equal(got.keep, keep)
    assert not got.rejected.any()


def test_modes_cut_something_in_these_cases():
    """The reference comparison above is not vacuous: each mode changes some weights."""
    old, rollout, mask = batch(spread=0.6)
    tis = compute_rollout_correction(old, rollout, mask, mode="tis", level="token", high=1.5)
    mis = compute_rollout_correction(old, rollout, mask, mode="mis", level="token", low=0.6, high=1.6)
    raw = (old - rollout).exp()
    assert ((raw > 1.5) & mask.bool()).any() and tis.weights.max() == pytest.approx(1.5)
    assert (mask.bool() & ~mis.keep).any() and mis.keep.any()


@pytest.mark.parametrize("veto, max_seq_kl", [(0.5, None), (None, 0.05), (0.5, 0.05)])
def test_veto_and_kl_bound_reject_whole_sequences(veto, max_seq_kl):
    old, rollout, mask = batch(spread=0.6)
    got = compute_rollout_correction(old, rollout, mask, mode="tis", level="token", high=2.0, veto=veto,
                                     max_seq_kl=max_seq_kl)
    weights, keep = reference_weights(old, rollout, mask, "tis", "token", 0.0, 2.0, veto, max_seq_kl)
    torch.testing.assert_close(got.weights, weights, rtol=1e-12, atol=1e-12)
    assert torch.equal(got.keep, keep)
    rows = mask.bool().any(-1)
    assert got.rejected[rows].any() and not got.keep[got.rejected].any()


@pytest.mark.parametrize("mode, level", itertools.product(ROLLOUT_CORRECTIONS.names(), ROLLOUT_IS_LEVELS.names()))
def test_weights_are_exactly_one_when_engine_and_trainer_agree(mode, level):
    old, _, mask = batch()
    got = compute_rollout_correction(old, old.clone(), mask, mode=mode, level=level, low=1.0, high=1.0,
                                     veto=1e-4, max_seq_kl=1e-9)
    assert torch.equal(got.weights, mask.to(old.dtype))
    assert torch.equal(got.keep, mask.bool())


def test_padding_values_never_matter():
    old, rollout, mask = batch()
    noisy_old, noisy_rollout = old.clone(), rollout.clone()
    noisy_old[~mask.bool()] = float("nan")
    noisy_rollout[~mask.bool()] = -1e4
    for level in LEVELS:
        a = compute_rollout_correction(old, rollout, mask, mode="mis", level=level, low=0.5, high=2.0, veto=1e-4)
        b = compute_rollout_correction(noisy_old, noisy_rollout, mask, mode="mis", level=level, low=0.5, high=2.0,
                                       veto=1e-4)
        assert torch.equal(a.weights, b.weights) and torch.equal(a.keep, b.keep)


def test_rows_do_not_depend_on_their_batch():
    """Per-sequence computation: a row's weights are the same alone or among others (micro-batch splits)."""
    old, rollout, mask = batch(spread=0.6)
    for level in LEVELS:
        whole = compute_rollout_correction(old, rollout, mask, mode="mis", level=level, low=0.5, high=1.8)
        for i in range(old.shape[0]):
            alone = compute_rollout_correction(old[i:i + 1], rollout[i:i + 1], mask[i:i + 1], mode="mis",
                                               level=level, low=0.5, high=1.8)
            assert torch.equal(alone.weights[0], whole.weights[i])


def test_huge_sequence_ratios_stay_finite():
    old = torch.zeros(2, 200)
    rollout = torch.full((2, 200), -1.0)  # log prod rho = 200: exp overflows float32 without care
    got = compute_rollout_correction(old, rollout, torch.ones(2, 200), mode="tis", level="sequence", high=2.0)
    assert torch.equal(got.weights, torch.full((2, 200), 2.0))
    dropped = compute_rollout_correction(old, rollout, torch.ones(2, 200), mode="mis", level="sequence", high=2.0)
    assert not dropped.keep.any() and torch.isfinite(dropped.weights).all()


def reference_ess(w):
    w = [float(x) for x in w]
    return sum(w) ** 2 / (len(w) * sum(x * x for x in w))


def test_effective_sample_size():
    w = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    assert float(effective_sample_size(w)) == pytest.approx(reference_ess(w))
    assert float(effective_sample_size(torch.ones(7))) == 1.0
    assert float(effective_sample_size(torch.tensor([0.0, 0.0, 5.0]))) == pytest.approx(1 / 3)
    assert float(effective_sample_size(torch.zeros(0))) == 1.0


def reference_bound(w, high, target):
    candidates = sorted({1.0, high} | {float(x) for x in w if 1.0 <= x < high})
    passing = [c for c in candidates if reference_ess([min(float(x), c) for x in w]) >= target]
    return max(passing) if passing else 1.0


@pytest.mark.parametrize("seed, target", itertools.product(range(5), (0.5, 0.8, 0.95, 0.999)))
def test_adaptive_bound_matches_brute_force(seed, target):
    g = torch.Generator().manual_seed(seed)
    w = torch.exp(0.7 * torch.randn(50, generator=g, dtype=torch.float64))
    high = 4.0
    bound = adaptive_truncation_bound(w, high, target)
    assert bound == pytest.approx(reference_bound(w, high, target), rel=1e-12)
    assert 1.0 <= bound <= high
    if bound > 1.0:  # the chosen bound passes, and the next larger candidate fails
        assert reference_ess(w.clamp(max=bound)) >= target - 1e-12
        larger = [float(x) for x in w if bound < x < high] + ([high] if bound < high else [])
        if larger:
            assert reference_ess(w.clamp(max=min(larger))) < target


def test_adaptive_bound_is_the_fixed_one_when_weights_agree_and_loosens_with_the_target():
    assert adaptive_truncation_bound(torch.ones(10), 2.0, 0.99) == 2.0
    g = torch.Generator().manual_seed(1)
    w = torch.exp(torch.randn(200, generator=g))
    bounds = [adaptive_truncation_bound(w, 10.0, t) for t in (0.9, 0.7, 0.5, 0.3)]
    assert bounds == sorted(bounds) and bounds[0] < bounds[-1]


# -------------------------------------------------------------------------- the loss with weights


def loss_inputs(seed=0, advantages_per_token=False):
    old, rollout, mask = batch(seed, spread=0.6)
    old, rollout = old.float(), rollout.float()
    g = torch.Generator().manual_seed(seed + 100)
    logprobs = (old + 0.1 * torch.randn(old.shape, generator=g)).requires_grad_()
    ref = old + 0.05 * torch.randn(old.shape, generator=g)
    adv = torch.randn(old.shape if advantages_per_token else old.shape[:1], generator=g)
    return logprobs, old, rollout, ref, adv, mask


def reference_loss(logprobs, old, ref, adv, weights, keep, variant, clip, loss_agg, kl_coef, max_len):
    """Per-token loop: weighted PPO surrogate plus unweighted k3 KL, over kept tokens only."""
    B, T = logprobs.shape
    total_pg, total_kl, rows = [], [], []
    for i in range(B):
        tokens = [t for t in range(T) if keep[i, t]]
        if not tokens:
            continue
        log_s = sum(logprobs[i, t] - old[i, t] for t in tokens) / len(tokens)
        pg, kl = [], []
        for t in tokens:
            a = adv[i, t] if adv.dim() == 2 else adv[i]
            if variant == "grpo":
                r = torch.exp(logprobs[i, t] - old[i, t])
            elif variant == "gspo":
                r = torch.exp(log_s)
            else:
                r = torch.exp(log_s.detach() + logprobs[i, t] - logprobs[i, t].detach())
            surrogate = torch.minimum(r * a, r.clamp(1 - clip[0], 1 + clip[1]) * a)
            pg.append(-surrogate * weights[i, t])
            d = ref[i, t] - logprobs[i, t]
            kl.append(torch.exp(d) - d - 1)
        total_pg.append(pg)
        total_kl.append(kl)
        rows.append(len(tokens))

    def agg(per_row):
        if loss_agg == "token_mean":
            return sum(sum(r) for r in per_row) / sum(rows)
        if loss_agg == "seq_mean_token_mean":
            return sum(sum(r) / len(r) for r in per_row) / len(rows)
        return sum(sum(r) for r in per_row) / (len(rows) * max_len)

    return agg(total_pg) + kl_coef * agg(total_kl)


@pytest.mark.parametrize("variant, loss_agg, mode, level", [
    *[(v, agg, "mis", "token") for v in ("grpo", "gspo", "gspo_token")
      for agg in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")],
    ("grpo", "token_mean", "tis", "sequence"), ("gspo", "seq_mean_token_mean", "tis", "geometric"),
    ("gspo_token", "token_mean", "reject", "geometric"), ("grpo", "seq_mean_token_mean", "tis", "token"),
])
def test_weighted_loss_and_gradient_match_the_reference(variant, loss_agg, mode, level):
    logprobs, old, rollout, ref, adv, mask = loss_inputs(advantages_per_token=variant != "gspo")
    clip = (0.2, 0.28) if variant == "grpo" else (0.05, 0.08)
    c = compute_rollout_correction(old, rollout, mask, mode=mode, level=level, low=0.6, high=1.6)
    keep = c.keep.float()
    assert (keep.sum() < mask.sum()) == (mode != "tis")  # tis truncates, the others drop some tokens here
    loss, _ = compute_policy_loss(logprobs, old, adv, keep, variant=variant, clip_low=clip[0], clip_high=clip[1],
                                  loss_agg=loss_agg, ref_logprobs=ref, kl_coef=0.1, max_response_length=6,
                                  is_weights=c.weights.float(),
                                  normalizer=loss_normalizer(keep, loss_agg, 6))
    (grad,) = torch.autograd.grad(loss, logprobs)
    expected = reference_loss(logprobs, old, ref, adv, c.weights, c.keep, variant, clip, loss_agg, 0.1, 6)
    (expected_grad,) = torch.autograd.grad(expected, logprobs)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)
    dropped = mask.bool() & ~c.keep
    assert torch.equal(grad[dropped], torch.zeros_like(grad[dropped]))


def test_dropped_tokens_leave_the_normaliser():
    """slime PR #657: a masked token in token_mean's denominator would shrink every kept token's gradient."""
    logprobs, old, rollout, _, adv, mask = loss_inputs()
    c = compute_rollout_correction(old, rollout, mask, mode="mis", level="token", low=0.6, high=1.6)
    keep = c.keep.float()
    assert loss_normalizer(keep, "token_mean") == float(c.keep.sum()) < float(mask.sum())
    corrected, _ = compute_policy_loss(logprobs, old, adv, keep, variant="grpo", clip_low=0.2, clip_high=0.28,
                                       loss_agg="token_mean", is_weights=c.weights.float())
    # Same as the kept tokens alone, weighted, over their own count.
    kept_only, _ = compute_policy_loss(logprobs, old, adv, keep, variant="grpo", clip_low=0.2, clip_high=0.28,
                                       loss_agg="token_mean", is_weights=c.weights.float(),
                                       normalizer=float(c.keep.sum()))
    torch.testing.assert_close(corrected, kept_only)


def test_weights_of_one_leave_the_loss_bit_identical():
    logprobs, old, _, ref, adv, mask = loss_inputs()
    for variant in ("grpo", "gspo", "gspo_token"):
        kwargs = dict(variant=variant, clip_low=0.2, clip_high=0.28, loss_agg="token_mean", ref_logprobs=ref,
                      kl_coef=0.1)
        plain, _ = compute_policy_loss(logprobs, old, adv, mask, **kwargs)
        ones, _ = compute_policy_loss(logprobs, old, adv, mask, is_weights=torch.ones_like(old), **kwargs)
        assert torch.equal(plain, ones)


def test_is_weights_of_the_wrong_shape_are_refused():
    logprobs, old, _, _, adv, mask = loss_inputs()
    with pytest.raises(ValueError, match="is_weights must have the shape"):
        compute_policy_loss(logprobs, old, adv, mask, variant="grpo", clip_low=0.2, clip_high=0.2,
                            loss_agg="token_mean", is_weights=torch.ones(3))


# -------------------------------------------------------------------------- metrics and pass@k


def test_metrics_match_the_reference():
    old, rollout, mask = batch(spread=0.4)
    m = mask.bool()
    c = compute_rollout_correction(old, rollout, mask, mode="tis", level="token", high=1.3)
    metrics = rollout_correction_metrics(old, rollout, mask, c, "token", 1.3)
    rho = (old - rollout).exp()
    rows = [i for i in range(old.shape[0]) if m[i].any()]
    seq = [float(rho[i][m[i]].prod()) for i in rows]
    log_ppl = [-float((old - rollout)[i][m[i]].mean()) for i in rows]
    expected = {
        "chi2_token": float((rho[m] ** 2).mean()) - 1,
        "chi2_seq": sum(s * s for s in seq) / len(seq) - 1,
        "log_ppl_diff": sum(log_ppl) / len(log_ppl),
        "ppl_ratio": sum(math.exp(v) for v in log_ppl) / len(log_ppl),
        "ess_raw": reference_ess(rho[m]),
        "ess": reference_ess(rho[m].clamp(max=1.3)),
        "frac_truncated": float((rho[m] > 1.3).float().mean()),
        "frac_masked": 0.0, "frac_rejected": 0.0,
        "weight_min": float(rho[m].min()), "weight_mean": float(rho[m].clamp(max=1.3).mean()),
        "weight_max": 1.3, "bound": 1.3,
    }
    assert set(metrics) == {f"rollout_correction/{k}" for k in expected}
    for key, value in expected.items():
        assert metrics[f"rollout_correction/{key}"] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert 0 < expected["frac_truncated"] < 1


def test_metrics_of_agreeing_policies():
    old, _, mask = batch()
    metrics = rollout_correction_metrics(old, old.clone(), mask)
    assert metrics == {"rollout_correction/chi2_token": 0.0, "rollout_correction/chi2_seq": 0.0,
                       "rollout_correction/log_ppl_diff": 0.0, "rollout_correction/ppl_ratio": 1.0,
                       "rollout_correction/ess_raw": 1.0}


def test_pass_at_k_matches_the_combinatorial_definition():
    for n, c, k in itertools.product(range(1, 9), range(0, 9), range(1, 9)):
        if c > n or k > n:
            continue
        expected = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="1 <= k <= num_samples"):
        pass_at_k(4, 1, 5)
