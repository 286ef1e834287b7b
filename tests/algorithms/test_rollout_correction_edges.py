"""Edge cases of the rollout correction and of pass@k, each against values written out by hand: the
boundaries mutation testing (scripts/mutation_test.py) found that test_rollout_correction.py let through
(ties with the veto, the KL bound and the ESS target, low = 0, empty rows, padding, tiny weights, large k).
Kept apart and fast, so that the mutation run meets them first."""
import math
import re

import pytest
import torch

from grpo_megatron.algorithms import (
    ROLLOUT_CORRECTIONS, ROLLOUT_IS_LEVELS, adaptive_truncation_bound, compute_rollout_correction,
    effective_sample_size, pass_at_k)
from grpo_megatron.algorithms.rollout_correction import unit_values
from tests.algorithms.test_rollout_correction import LEVELS, batch


def test_pass_at_k_refuses_counts_outside_their_range():
    with pytest.raises(ValueError, match="1 <= k <= num_samples"):
        pass_at_k(4, 1, 0)
    for bad in (-1, 5):
        with pytest.raises(ValueError, match=re.escape(f"num_correct={bad} must be in [0, num_samples=4]")):
            pass_at_k(4, bad, 2)


def test_pass_at_k_is_one_when_any_k_draws_must_hit():
    """n - c < k: every draw of k contains a correct one. Also for k in the thousands, where the product
    1 - k/i over i = n-c+1..n would overflow before reaching its zero factor (i = k) and give NaN."""
    assert pass_at_k(4, 4, 1) == 1.0 and pass_at_k(4, 2, 3) == 1.0
    assert pass_at_k(2000, 1995, 1200) == 1.0
    assert pass_at_k(2000, 5, 1200) == pytest.approx(1 - math.comb(1995, 1200) / math.comb(2000, 1200), abs=1e-12)



def test_modes_and_levels_on_their_own():
    """The registered functions as a caller of ROLLOUT_CORRECTIONS / ROLLOUT_IS_LEVELS gets them: a dropped
    unit has weight 0, low = 0 has no lower bound, and an empty row's unit is 0 (not 0/0)."""
    log_w = torch.tensor([[-3.0, 0.5, 1.0]], dtype=torch.float64)
    weights, keep = ROLLOUT_CORRECTIONS.get("mis")(log_w, 0.0, 2.0)  # e^-3, e^0.5 <= 2 < e
    assert weights.shape == (1, 3) and weights[0].tolist() == pytest.approx([math.exp(-3.0), math.exp(0.5), 0.0], rel=1e-12)
    assert keep.tolist() == [[True, True, False]]
    weights, keep = ROLLOUT_CORRECTIONS.get("mis")(log_w, 0.1, 2.0)  # e^-3 = 0.05 < 0.1
    assert weights[0].tolist() == pytest.approx([0.0, math.exp(0.5), 0.0], rel=1e-12)
    weights, keep = ROLLOUT_CORRECTIONS.get("reject")(log_w, 0.0, 2.0)
    assert weights.tolist() == [[1.0, 1.0, 0.0]] and keep.tolist() == [[True, True, False]]

    log_rho = torch.tensor([[0.2, -0.4, 5.0], [7.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    sequence = ROLLOUT_IS_LEVELS.get("sequence")(log_rho, mask)
    geometric = ROLLOUT_IS_LEVELS.get("geometric")(log_rho, mask)
    torch.testing.assert_close(sequence, torch.tensor([[-0.2] * 3, [0.0] * 3], dtype=torch.float64))
    torch.testing.assert_close(geometric, torch.tensor([[-0.1] * 3, [0.0] * 3], dtype=torch.float64))


@pytest.mark.parametrize("mode", ["mis", "reject"])
def test_low_zero_keeps_every_weight_up_to_high(mode):
    """low = 0.0, the default: rho = e^-3 stays (only the upper bound drops, here e > 2)."""
    old = torch.tensor([[-3.0, -1.0, 0.0]], dtype=torch.float64)
    rollout = torch.tensor([[0.0, -1.5, -1.0]], dtype=torch.float64)
    got = compute_rollout_correction(old, rollout, torch.ones(1, 3), mode=mode, level="token", high=2.0)
    assert got.keep.tolist() == [[True, True, False]]
    expected = [math.exp(-3.0), math.exp(0.5), 0.0] if mode == "mis" else [1.0, 1.0, 0.0]
    assert got.weights[0].tolist() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("level", LEVELS)
def test_log_unit_is_the_levels_log_weight_and_zero_on_padding(level):
    old, rollout, mask = batch(spread=0.6)
    got = compute_rollout_correction(old, rollout, mask, mode="tis", level=level, high=1.5)
    for i in range(old.shape[0]):
        tokens = [t for t in range(old.shape[1]) if mask[i, t]]
        log_rho = [float(old[i, t] - rollout[i, t]) for t in tokens]
        for t in range(old.shape[1]):
            if t not in tokens:
                expected = 0.0
            elif level == "token":
                expected = float(old[i, t] - rollout[i, t])
            else:
                expected = sum(log_rho) / (1 if level == "sequence" else len(tokens))
            assert float(got.log_unit[i, t]) == pytest.approx(expected, abs=1e-12), (i, t)


def test_a_ratio_equal_to_the_veto_is_not_vetoed():
    """Rejected when rho_t < veto: rho = 0.5 = veto stays, rho = 0.25 goes (log-probs exact in binary64)."""
    old = torch.tensor([[math.log(0.5), -1.0], [math.log(0.25), -1.0]], dtype=torch.float64)
    rollout = torch.tensor([[0.0, -1.0], [0.0, -1.0]], dtype=torch.float64)
    got = compute_rollout_correction(old, rollout, torch.ones(2, 2), mode="tis", level="token", veto=0.5)
    assert got.rejected.tolist() == [False, True]
    assert got.keep.tolist() == [[True, True], [False, False]]


def test_the_kl_bound_is_on_the_mean_token_k3_and_a_tie_is_kept():
    """k3(d) = e^d - d - 1 with d = old - rollout. Row 0: two tokens of d = -1 (mean e^-1 = 0.37, sum 0.74);
    row 1: one of d = -1.5 (0.72); row 2: agreeing. max_seq_kl = 0.5 rejects row 1 only."""
    old = torch.tensor([[-1.5, -1.5], [-2.0, -1.0], [-1.0, -2.0]], dtype=torch.float64)
    rollout = torch.tensor([[-0.5, -0.5], [-0.5, 0.0], [-1.0, -2.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    got = compute_rollout_correction(old, rollout, mask, mode="tis", level="token", max_seq_kl=0.5)
    assert got.rejected.tolist() == [False, True, False]
    # A mean k3 exactly on the bound is not above it: k3 = 0 at 0, and row 0's e^-1 at its own value.
    assert compute_rollout_correction(old, rollout, mask, mode="tis", level="token",
                                      max_seq_kl=0.0).rejected.tolist() == [True, True, False]
    d = old - rollout
    row0 = float((torch.expm1(d) - d)[0, 0])
    assert row0 == pytest.approx(math.exp(-1.0), rel=1e-12)
    assert compute_rollout_correction(old, rollout, mask, mode="tis", level="token",
                                      max_seq_kl=row0).rejected.tolist() == [False, True, False]


@pytest.mark.parametrize("level", ["sequence", "geometric"])
def test_unit_values_take_each_non_empty_rows_first_response_token(level):
    """3 rows x 4 positions (not square): row 0 starts at position 1, row 1 is empty, row 2 is full."""
    values = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    assert unit_values(values, mask, level).tolist() == [1.0, 8.0]
    assert unit_values(values, mask, "token").tolist() == [1.0, 2.0, 8.0, 9.0, 10.0, 11.0]


def test_effective_sample_size_edge_cases():
    """All-zero weights: nothing to correct, 1. Weights below 1 ((0.75)^2 / (2 * 0.3125) = 0.9). Equal
    tiny weights are equal weights: ESS 1, in float32 and float64 (a sum of squares under 1e-30 once
    met a floor there)."""
    assert float(effective_sample_size(torch.zeros(3))) == 1.0
    assert float(effective_sample_size(torch.tensor([0.5, 0.25], dtype=torch.float64))) == pytest.approx(0.9, rel=1e-12)
    for dtype in (torch.float32, torch.float64):
        assert float(effective_sample_size(torch.full((3,), 1e-20, dtype=dtype))) == pytest.approx(1.0, rel=1e-6)
        assert float(effective_sample_size(torch.tensor([1e-20, 0.0, 0.0], dtype=dtype))) == pytest.approx(1 / 3, rel=1e-6)
        assert float(effective_sample_size(torch.tensor([2e-20], dtype=dtype))) == pytest.approx(1.0, rel=1e-6)


def test_adaptive_bound_edge_cases():
    # Only C = 1 passes: ESS([0.5, 1]) = 2.25 / 2.5 = 0.9 >= 0.8 > ESS([0.5, 2]) = 6.25 / 8.5; none in [1, 2).
    assert adaptive_truncation_bound(torch.tensor([0.5, 4.0]), 2.0, 0.8) == 1.0
    # A tie passes: ESS(min(w, 2)) = ESS([1, 2]) = 9 / 10 = 0.9 exactly, and all-equal weights have ESS 1.
    assert adaptive_truncation_bound(torch.tensor([1.0, 2.0]), 2.0, 0.9) == 2.0
    assert adaptive_truncation_bound(torch.ones(4), 3.0, 1.0) == 3.0
    # Equal tiny weights need no truncation: the fixed bound, not 1.
    assert adaptive_truncation_bound(torch.full((4,), 1e-20, dtype=torch.float64), 3.0, 0.9) == 3.0
