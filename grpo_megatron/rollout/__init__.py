"""Rollouts: generation engines, prompt datasets, rule-based rewards and the synthetic CPU tasks."""
from grpo_megatron.rollout import tasks  # noqa: F401  (registers the synthetic tasks' rewards)
