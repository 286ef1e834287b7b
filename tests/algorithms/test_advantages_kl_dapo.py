"""Advantages, KL estimators and DAPO pieces against direct formulas; the registries."""
from __future__ import annotations

import math

import pytest
import torch

from grpo_megatron.algorithms import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    Registry,
    compute_group_advantages,
    dynamic_sampling_keep,
    estimate_kl,
    overlong_filter_mask,
    overlong_reward_penalty,
)
from tests.algorithms import reference


@pytest.mark.parametrize("normalize_std", [True, False])
@pytest.mark.parametrize("group_size", [1, 2, 5])
def test_group_advantages_match_reference(normalize_std, group_size):
    gen = torch.Generator().manual_seed(group_size)
    rewards = torch.randint(0, 3, (4 * group_size,), generator=gen).double() + 0.1 * torch.rand(4 * group_size, generator=gen, dtype=torch.float64)
    rewards[:group_size] = 0.7  # one constant group
    ours = compute_group_advantages(rewards, group_size, normalize_std=normalize_std, eps=1e-6)
    expected = reference.group_advantages(rewards.tolist(), group_size, normalize_std, 1e-6)
    torch.testing.assert_close(ours, torch.tensor(expected, dtype=torch.float64))


def test_advantage_estimators_by_name():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(ADVANTAGE_ESTIMATORS.get("dr_grpo")(rewards, 4), torch.tensor([0.75, -0.25, -0.25, -0.25]))
    std = math.sqrt(0.1875)
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25]) / (std + 1e-6)
    torch.testing.assert_close(ADVANTAGE_ESTIMATORS.get("grpo")(rewards, 4), expected)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_match_formulas(estimator):
    gen = torch.Generator().manual_seed(0)
    logp, ref = -3 * torch.rand(2, 20, generator=gen, dtype=torch.float64)
    ours = estimate_kl(logp, ref, estimator)
    expected = torch.stack([reference.kl_term(a, b, estimator) for a, b in zip(logp, ref)])
    torch.testing.assert_close(ours, expected)
    if estimator != "k1":
        assert (ours >= 0).all()


def test_k3_estimates_the_true_kl():
    """E_{x ~ q}[k3] = KL(q || p) on a small categorical pair."""
    q = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    p = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    expected = (q * (q / p).log()).sum()
    for estimator in ("k1", "k3"):
        assert (q * estimate_kl(q.log(), p.log(), estimator)).sum().item() == pytest.approx(expected.item())


def test_dynamic_sampling_keeps_mixed_groups():
    correct = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    assert dynamic_sampling_keep(correct, 4).tolist() == [False, True, False]  # 0 < #correct < G
    graded = torch.tensor([0.5, 0.5, 0.5, 0.51])
    assert dynamic_sampling_keep(graded, 2).tolist() == [False, True]  # reward std > 0


def test_overlong_reward_penalty_piecewise():
    max_length, cache = 20, 4
    lengths = torch.arange(0, 26)
    ours = overlong_reward_penalty(lengths, max_length, cache)
    for length, value in zip(lengths.tolist(), ours.tolist()):
        if length <= max_length - cache:
            expected = 0.0
        elif length <= max_length:
            expected = ((max_length - cache) - length) / cache
        else:
            expected = -1.0
        assert value == pytest.approx(expected), length
    assert ours[20].item() == -1.0 and ours[18].item() == -0.5


def test_overlong_filter_masks_truncated_rows():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.float32)
    filtered = overlong_filter_mask(mask, torch.tensor([False, True, False]))
    assert filtered.tolist() == [[1, 1, 0], [0, 0, 0], [1, 0, 0]] and filtered.dtype == mask.dtype


def test_registries_list_builtins():
    assert POLICY_LOSSES.names() == ("cispo", "clip_cov", "dppo_kl", "dppo_tv", "gmpo", "grpo", "gspo", "gspo_token",
                                     "kl_cov", "sapo")
    assert ADVANTAGE_ESTIMATORS.names() == ("dr_grpo", "grpo")
    assert KL_ESTIMATORS.names() == ("k1", "k2", "k3")
    assert LOSS_AGGREGATIONS.names() == ("seq_mean_token_mean", "seq_mean_token_sum_norm", "token_mean")


def test_one_decorated_function_adds_an_entry():
    registry = Registry("widget")

    @registry.register("spin")
    def spin() -> str:
        return "spun"

    assert "spin" in registry and registry.get("spin")() == "spun" and registry.names() == ("spin",)
