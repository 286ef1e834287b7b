"""Hypothesis properties of the policy losses and advantages."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from grpo_megatron.algorithms import (
    POLICY_LOSSES,
    LossParams,
    compute_group_advantages,
    compute_policy_loss,
    loss_normalizer,
    select_tokens,
)

LOSS_AGGS = st.sampled_from(["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
MAX_LEN = 16
settings.register_profile("algorithms", max_examples=25, deadline=None)
settings.load_profile("algorithms")


@st.composite
def batches(draw, per_token_adv: bool = False):
    """A float64 batch [B, T] with random response lengths (0 allowed) and off-policy spread."""
    batch = draw(st.integers(1, 6))
    length = draw(st.integers(1, 8))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    spread = draw(st.sampled_from([0.0, 0.01, 0.3, 2.0]))
    logp = -torch.rand(batch, length, generator=gen, dtype=torch.float64) * 4
    old = logp + spread * torch.randn(batch, length, generator=gen, dtype=torch.float64)
    lengths = torch.randint(0, length + 1, (batch,), generator=gen)
    mask = (torch.arange(length) < lengths.unsqueeze(-1)).float()
    adv_shape = (batch, length) if per_token_adv else (batch,)
    adv = torch.randn(adv_shape, generator=gen, dtype=torch.float64)
    return logp, old, adv, mask


CLIPS = st.sampled_from([(0.2, 0.28), (0.01, 0.02), (3e-4, 4e-4)])


def loss_and_grad(logp, old, adv, mask, **kwargs):
    logp = logp.clone().requires_grad_()
    loss, _ = compute_policy_loss(logp, old, adv, mask, max_response_length=MAX_LEN, **kwargs)
    grad, = torch.autograd.grad(loss, logp, allow_unused=False)
    return loss.detach(), grad


@given(batches(), LOSS_AGGS, CLIPS, st.sampled_from([None, 2.0]))
def test_gspo_token_equals_gspo_for_constant_advantages(batch, loss_agg, clip, dual_c):
    logp, old, adv, mask = batch
    common = dict(clip_low=clip[0], clip_high=clip[1], loss_agg=loss_agg, dual_clip_c=dual_c)
    seq_loss, seq_grad = loss_and_grad(logp, old, adv, mask, variant="gspo", **common)
    expanded = adv.unsqueeze(-1).expand_as(logp)
    token_loss, token_grad = loss_and_grad(logp, old, expanded, mask, variant="gspo_token", **common)
    torch.testing.assert_close(seq_loss, token_loss)
    torch.testing.assert_close(seq_grad, token_grad)


@given(batches(per_token_adv=True), LOSS_AGGS)
def test_unclipped_grpo_on_policy_is_reinforce_with_baseline(batch, loss_agg):
    """clip = inf, pi = pi_old: grad loss = -sum_it A_it grad log pi(y_it) / normaliser
    (with 1/|y_i| inside for seq_mean_token_mean)."""
    logp, _, adv, mask = batch
    inf = float("inf")
    _, grad = loss_and_grad(logp, logp, adv, mask, variant="grpo", clip_low=inf, clip_high=inf, loss_agg=loss_agg)
    weights = mask.clone()
    if loss_agg == "seq_mean_token_mean":
        weights = weights / mask.sum(-1, keepdim=True).clamp(min=1)
    expected = -adv * weights / max(loss_normalizer(mask, loss_agg, MAX_LEN), 1.0)
    torch.testing.assert_close(grad, expected)


@given(batches(), LOSS_AGGS, st.sampled_from(["grpo", "gspo", "gspo_token"]), st.integers(1, 4), st.booleans())
def test_micro_batches_with_global_normalizer_add_up(batch, loss_agg, variant, num_micro, with_kl):
    logp, old, adv, mask = batch
    ref = old.flip(-1)
    common = dict(variant=variant, clip_low=0.05, clip_high=0.08, loss_agg=loss_agg, kl_coef=0.1 if with_kl else 0.0)
    full_loss, full_grad = loss_and_grad(logp, old, adv, mask, ref_logprobs=ref, **common)
    normalizer = loss_normalizer(mask, loss_agg, MAX_LEN)
    if normalizer == 0:
        return  # an all-padding global batch has no loss to split
    losses, grads = [], []
    for rows in torch.arange(logp.shape[0]).tensor_split(num_micro):
        loss, grad = loss_and_grad(logp[rows], old[rows], adv[rows], mask[rows], ref_logprobs=ref[rows],
                                   normalizer=normalizer, **common)
        losses.append(loss)
        grads.append(grad)
    torch.testing.assert_close(sum(losses), full_loss)
    torch.testing.assert_close(torch.cat(grads), full_grad)


SPLIT_PARAMS = LossParams(clip_cov_ratio=0.3, clip_cov_lb=0.0, kl_cov_ratio=0.3)
"""Selections of several tokens per batch, so that a split that changed them would show."""


@given(batches(), LOSS_AGGS, st.sampled_from(POLICY_LOSSES.names()), st.integers(1, 3), st.integers(1, 3),
       st.integers(0, 2**31 - 1), st.booleans())
def test_any_split_over_ranks_and_micro_batches_gives_the_global_gradient(
        batch, loss_agg, variant, ranks, micro_per_rank, seed, with_kl):
    """The trainer's recipe for every loss: the normaliser and (clip_cov, kl_cov) the token selection are
    computed once over the global batch, from the old log-probs, and handed to every micro-batch; rows are
    then dealt to data-parallel ranks and micro-batches in any way. The summed losses and the gradients
    (DP all-reduce: a sum) are those of the whole batch."""
    logp, old, adv, mask = batch
    logp, old = logp.clamp(max=0.0), old.clamp(max=0.0)  # log-probs, as DPPO reads them
    ref = old.flip(-1)
    common = dict(variant=variant, loss_agg=loss_agg, kl_coef=0.1 if with_kl else 0.0, params=SPLIT_PARAMS)
    selection = None
    if POLICY_LOSSES.get(variant).needs_selection:
        selection = select_tokens(variant, old, adv, mask, SPLIT_PARAMS, torch.Generator().manual_seed(seed))
    full_loss, full_grad = loss_and_grad(logp, old, adv, mask, ref_logprobs=ref, token_selection=selection, **common)
    normalizer = loss_normalizer(mask, loss_agg, MAX_LEN)
    if normalizer == 0:
        return  # an all-padding global batch has no loss to split
    groups = torch.randint(0, ranks * micro_per_rank, (logp.shape[0],), generator=torch.Generator().manual_seed(seed))
    total, grad = torch.zeros(()), torch.zeros_like(logp)
    for group in range(ranks * micro_per_rank):
        rows = (groups == group).nonzero().squeeze(-1)
        if rows.numel() == 0:
            continue
        part = None if selection is None else selection[rows]
        loss, part_grad = loss_and_grad(logp[rows], old[rows], adv[rows], mask[rows], ref_logprobs=ref[rows],
                                        token_selection=part, normalizer=normalizer, **common)
        total = total + loss
        grad[rows] = part_grad
    torch.testing.assert_close(total, full_loss.to(total.dtype))
    torch.testing.assert_close(grad, full_grad)


@given(batches(), LOSS_AGGS, st.sampled_from(["grpo", "gspo", "gspo_token"]), st.integers(1, 3), st.integers(0, 2))
def test_extra_padding_changes_nothing(batch, loss_agg, variant, extra_columns, extra_rows):
    logp, old, adv, mask = batch
    common = dict(variant=variant, clip_low=0.05, clip_high=0.08, loss_agg=loss_agg)
    loss, grad = loss_and_grad(logp, old, adv, mask, **common)

    def pad(tensor, value):
        tensor = torch.cat([tensor, torch.full((tensor.shape[0], extra_columns), value, dtype=tensor.dtype)], dim=1)
        return torch.cat([tensor, torch.full((extra_rows, tensor.shape[1]), value, dtype=tensor.dtype)], dim=0)

    padded_adv = torch.cat([adv, torch.full((extra_rows,), 5.0, dtype=adv.dtype)])
    padded_loss, padded_grad = loss_and_grad(pad(logp, -3.0), pad(old, 7.0), padded_adv, pad(mask, 0.0), **common)
    torch.testing.assert_close(padded_loss, loss)
    torch.testing.assert_close(padded_grad[: logp.shape[0], : logp.shape[1]], grad)
    assert padded_grad[logp.shape[0]:].abs().sum() == 0 and padded_grad[:, logp.shape[1]:].abs().sum() == 0


@given(
    st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=5),
    st.integers(1, 8),
    st.booleans(),
    st.sampled_from([0.0, 1e-6]),
)
def test_constant_reward_groups_have_zero_advantage(group_values, group_size, normalize_std, eps):
    rewards = torch.tensor(group_values, dtype=torch.float64).repeat_interleave(group_size)
    advantages = compute_group_advantages(rewards, group_size, normalize_std=normalize_std, eps=eps)
    assert torch.equal(advantages, torch.zeros_like(rewards))
