"""Pure-torch RL algorithms: advantages, policy losses (GRPO, GSPO, GSPO-token, CISPO, SAPO, GMPO, Clip-Cov,
KL-Cov, DPPO-TV/KL), KL, DAPO, log-probs, rollout (train-inference mismatch) correction, pass@k.

Everything selectable from the config is looked up by name in the registries of registry.py.
"""
from grpo_megatron.algorithms.advantages import compute_group_advantages, dr_grpo_advantages, grpo_advantages
from grpo_megatron.algorithms.aggregation import LossAggregation, aggregate_loss, loss_normalizer
from grpo_megatron.algorithms.dapo import dynamic_sampling_keep, overlong_filter_mask, overlong_reward_penalty
from grpo_megatron.algorithms.kl import MAX_LOG_RATIO, estimate_kl
from grpo_megatron.algorithms.logprobs import token_logprobs_and_entropy
from grpo_megatron.algorithms.loss_params import LossParams
from grpo_megatron.algorithms.policy_loss import (
    DAPO_CLIP,
    GSPO_PAPER_CLIP,
    PPO_CLIP,
    ClipRange,
    PolicyLoss,
    Surrogate,
    clipped_surrogate,
    compute_policy_loss,
    resolve_clip,
    sequence_log_ratio,
)
from grpo_megatron.algorithms import covariance, gmpo, is_weighted  # noqa: F401  (register their losses)
from grpo_megatron.algorithms.token_selection import covariance_scores, select_tokens
from grpo_megatron.algorithms.registry import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    ROLLOUT_CORRECTIONS,
    ROLLOUT_IS_LEVELS,
    Registry,
)
from grpo_megatron.algorithms.rollout_correction import (
    Correction,
    adaptive_truncation_bound,
    compute_rollout_correction,
    effective_sample_size,
)
from grpo_megatron.algorithms.evaluation import pass_at_k

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "DAPO_CLIP",
    "GSPO_PAPER_CLIP",
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "MAX_LOG_RATIO",
    "POLICY_LOSSES",
    "ROLLOUT_CORRECTIONS",
    "ROLLOUT_IS_LEVELS",
    "ClipRange",
    "Correction",
    "LossAggregation",
    "LossParams",
    "PPO_CLIP",
    "PolicyLoss",
    "Registry",
    "Surrogate",
    "adaptive_truncation_bound",
    "aggregate_loss",
    "clipped_surrogate",
    "compute_group_advantages",
    "compute_policy_loss",
    "dr_grpo_advantages",
    "compute_rollout_correction",
    "covariance_scores",
    "dynamic_sampling_keep",
    "effective_sample_size",
    "estimate_kl",
    "grpo_advantages",
    "loss_normalizer",
    "overlong_filter_mask",
    "overlong_reward_penalty",
    "pass_at_k",
    "resolve_clip",
    "select_tokens",
    "sequence_log_ratio",
    "token_logprobs_and_entropy",
]
