"""The algorithm tables, so the config picks algorithms by name.

A new loss variant, advantage estimator, KL estimator or loss aggregation is added by
decorating one function (or registering one object) here; nothing else needs to change.
"""
from __future__ import annotations

from grpo_megatron.registry import Registry

POLICY_LOSSES: Registry = Registry("policy loss")
ADVANTAGE_ESTIMATORS: Registry = Registry("advantage estimator")
KL_ESTIMATORS: Registry = Registry("KL estimator")
LOSS_AGGREGATIONS: Registry = Registry("loss aggregation")
ROLLOUT_CORRECTIONS: Registry = Registry("rollout correction mode")
ROLLOUT_IS_LEVELS: Registry = Registry("rollout correction level")

__all__ = ["ADVANTAGE_ESTIMATORS", "KL_ESTIMATORS", "LOSS_AGGREGATIONS", "POLICY_LOSSES", "ROLLOUT_CORRECTIONS",
           "ROLLOUT_IS_LEVELS", "Registry"]
