"""Every error the algorithms package raises, with its exact message."""
from __future__ import annotations

import re

import pytest
import torch

from grpo_megatron.algorithms import (
    POLICY_LOSSES,
    LossParams,
    aggregate_loss,
    compute_group_advantages,
    compute_policy_loss,
    dynamic_sampling_keep,
    estimate_kl,
    loss_normalizer,
    overlong_filter_mask,
    overlong_reward_penalty,
    select_tokens,
    token_logprobs_and_entropy,
)
from grpo_megatron.algorithms.advantages import grpo_advantages

B, T = 2, 3
LOGP = torch.zeros(B, T)
MASK = torch.ones(B, T)
ADV = torch.zeros(B)


def policy_loss(**overrides):
    kwargs = dict(logprobs=LOGP, old_logprobs=LOGP, advantages=ADV, response_mask=MASK, variant="grpo",
                  clip_low=0.2, clip_high=0.2, loss_agg="token_mean")
    kwargs.update(overrides)
    return lambda: compute_policy_loss(**kwargs)


CASES = {
    "unknown policy loss": (policy_loss(variant="gpso"), "unknown policy loss 'gpso'; known: cispo, clip_cov, dppo_kl, dppo_tv, gmpo, grpo, gspo, gspo_token, kl_cov, sapo"),
    "unknown loss aggregation": (
        policy_loss(loss_agg="mean"),
        "unknown loss aggregation 'mean'; known: seq_mean_token_mean, seq_mean_token_sum_norm, token_mean",
    ),
    "unknown KL estimator": (policy_loss(kl_estimator="k4"), "unknown KL estimator 'k4'; known: k1, k2, k3"),
    "unknown KL estimator in estimate_kl": (lambda: estimate_kl(LOGP, LOGP, "k0"), "unknown KL estimator 'k0'; known: k1, k2, k3"),
    "duplicate registration": (lambda: POLICY_LOSSES.register("grpo")(lambda: None), "policy loss 'grpo' is already registered"),
    "logprobs not 2-D": (policy_loss(logprobs=torch.zeros(B)), "logprobs must be [B, T], got shape (2,)"),
    "old_logprobs shape": (
        policy_loss(old_logprobs=torch.zeros(B, T + 1)),
        "old_logprobs must have the shape of logprobs (2, 3), got (2, 4)",
    ),
    "response_mask shape": (
        policy_loss(response_mask=torch.ones(B + 1, T)),
        "response_mask must have the shape of logprobs (2, 3), got (3, 3)",
    ),
    "ref_logprobs shape": (
        policy_loss(ref_logprobs=torch.zeros(B)),
        "ref_logprobs must have the shape of logprobs (2, 3), got (2,)",
    ),
    "entropy shape": (policy_loss(entropy=torch.zeros(T, B)), "entropy must have the shape of logprobs (2, 3), got (3, 2)"),
    "advantages shape": (
        policy_loss(advantages=torch.zeros(T)),
        "advantages must be [B] or [B, T] = (2, 3), got (3,)",
    ),
    "negative clip": (policy_loss(clip_low=-0.1), "clip_low and clip_high must be >= 0, got -0.1 and 0.2"),
    "dual clip <= 1": (policy_loss(dual_clip_c=1.0), "dual_clip_c must be > 1, got 1.0"),
    "kl without reference": (policy_loss(kl_coef=0.1), "kl_coef=0.1 needs ref_logprobs"),
    "clip for a loss without clip range": (
        policy_loss(variant="sapo"), "policy loss 'sapo' has no clip range; remove clip_low / clip_high"),
    "clip_high alone for kl_cov": (
        policy_loss(variant="kl_cov", clip_low=None), "policy loss 'kl_cov' has no clip range; remove clip_low / clip_high"),
    "dual clip with a non-PPO loss": (
        policy_loss(variant="cispo", dual_clip_c=3.0),
        "dual_clip_c acts only with the PPO-clipped losses (clip_cov, grpo, gspo, gspo_token), not 'cispo'; remove it"),
    "negative default-completed clip": (
        policy_loss(variant="gmpo", clip_low=None, clip_high=-1.0), "clip_low and clip_high must be >= 0, got 0.4 and -1.0"),
    "gmpo with per-token advantages": (
        policy_loss(variant="gmpo", clip_low=None, clip_high=None, advantages=torch.zeros(B, T)),
        "policy loss 'gmpo' needs per-sequence advantages [B], got shape (2, 3)"),
    "token selection shape": (
        policy_loss(variant="kl_cov", clip_low=None, clip_high=None, token_selection=torch.zeros(B)),
        "token_selection must have the shape of logprobs (2, 3), got (2,)"),
    "sapo tau": (policy_loss(variant="sapo", clip_low=None, clip_high=None, params=LossParams(sapo_tau_neg=0.0)),
                 "sapo_tau_pos and sapo_tau_neg must be > 0 (paper: 1.0 and 1.05), got 1.0 and 0.0"),
    "cov ratio": (lambda: LossParams(kl_cov_ratio=1.5).check(),
                  "kl_cov_ratio must be in (0, 1] (a fraction of the batch's tokens, e.g. 2e-4), got 1.5"),
    "clip_cov ratio zero": (lambda: LossParams(clip_cov_ratio=0.0).check(),
                            "clip_cov_ratio must be in (0, 1] (a fraction of the batch's tokens, e.g. 2e-4), got 0.0"),
    "clip_cov band": (lambda: LossParams(clip_cov_lb=5.0).check(),
                      "clip_cov_lb must be below clip_cov_ub (paper: 1 and 5), got 5.0 and 5.0"),
    "kl_cov coef": (lambda: LossParams(kl_cov_coef=-0.1).check(), "kl_cov_coef must be >= 0 (paper: 1), got -0.1"),
    "selection for another loss": (lambda: select_tokens("grpo", LOGP, ADV, MASK, LossParams()),
                                   "policy loss 'grpo' selects no tokens; use clip_cov or kl_cov"),
    "gspo with per-token advantages": (
        policy_loss(variant="gspo", advantages=torch.zeros(B, T)),
        "policy loss 'gspo' needs per-sequence advantages [B], got shape (2, 3); use 'gspo_token' for per-token advantages",
    ),
    "sum_norm without max length": (
        policy_loss(loss_agg="seq_mean_token_sum_norm"),
        "loss_agg 'seq_mean_token_sum_norm' needs max_response_length >= 1 (or an explicit normalizer), got None",
    ),
    "sum_norm normaliser without max length": (
        lambda: loss_normalizer(MASK, "seq_mean_token_sum_norm", 0),
        "loss_agg 'seq_mean_token_sum_norm' needs max_response_length >= 1 (or an explicit normalizer), got 0",
    ),
    "non-positive normaliser": (lambda: aggregate_loss(LOGP, MASK, "token_mean", 0.0), "normalizer must be > 0, got 0.0"),
    "rewards not flat": (
        lambda: compute_group_advantages(torch.zeros(2, 2), 2),
        "rewards must be a flat [num_prompts * group_size] tensor, got shape (2, 2)",
    ),
    "rewards not divisible": (lambda: grpo_advantages(torch.zeros(5), 2), "5 rewards cannot be split into groups of 2"),
    "group size 0": (lambda: compute_group_advantages(torch.zeros(4), 0), "4 rewards cannot be split into groups of 0"),
    "dynamic sampling shape": (
        lambda: dynamic_sampling_keep(torch.zeros(5), 2),
        "rewards of shape (5,) cannot be split into groups of 2",
    ),
    "overlong cache too long": (
        lambda: overlong_reward_penalty(torch.zeros(3), 4, 8),
        "need 0 < cache_length <= max_length, got cache_length=8, max_length=4",
    ),
    "overlong cache zero": (
        lambda: overlong_reward_penalty(torch.zeros(3), 4, 0),
        "need 0 < cache_length <= max_length, got cache_length=0, max_length=4",
    ),
    "overlong filter shape": (
        lambda: overlong_filter_mask(MASK, torch.zeros(B, 1, dtype=torch.bool)),
        "truncated must be [B] = (2,), got (2, 1)",
    ),
    "logprobs targets shape": (
        lambda: token_logprobs_and_entropy(torch.zeros(B, T, 5), torch.zeros(B, dtype=torch.long)),
        "targets must be logits.shape[:-1] = (2, 3), got (2,)",
    ),
    "temperature": (
        lambda: token_logprobs_and_entropy(torch.zeros(B, 5), torch.zeros(B, dtype=torch.long), temperature=0.0),
        "temperature must be > 0, got 0.0",
    ),
    "chunk size": (
        lambda: token_logprobs_and_entropy(torch.zeros(B, 5), torch.zeros(B, dtype=torch.long), chunk_size=0),
        "chunk_size must be >= 1, got 0",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_error_message(case):
    call, message = CASES[case]
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        call()
