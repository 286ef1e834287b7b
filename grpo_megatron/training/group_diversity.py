"""Groups whose samples are all the same response: at temperature > 0 the sign of a shared sampling seed.

A server that seeds its sampler per request (SGLang with --enable-deterministic-inference) answers every sample
that carries the same seed with the same tokens; every advantage of such a group is 0 and the step learns
nothing, with no error anywhere. The metric `rollout/identical_groups` and a loud warning make that visible; the
warning leaves out groups a converged policy repeats with near certainty (`rollout/identical_uncertain_groups`).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence

from grpo_megatron.samples import Sample

logger = logging.getLogger(__name__)


# A response whose tokens the policy sampled with a mean log-prob above this (mean probability ~0.9) is one a
# converged policy draws again and again: G copies of it are expected, not a sign of a shared seed.
CERTAIN_MEAN_LOGPROB = math.log(0.9)


def identical_group_fraction(samples: Sequence[Sample], group_size: int, uncertain_only: bool = False) -> float:
    """The fraction of the groups (consecutive runs of group_size samples) whose responses are all equal; with
    `uncertain_only`, of those whose shared response the policy did not sample near-certainly (engine log-probs)."""
    groups = [samples[i:i + group_size] for i in range(0, len(samples), group_size)]
    same = sum(1 for g in groups if len(g) > 1 and all(s.response_ids == g[0].response_ids for s in g[1:])
               and not (uncertain_only and _near_certain(g)))
    return same / max(len(groups), 1)


def _near_certain(group: Sequence[Sample]) -> bool:
    logprobs = [lp for s in group for lp in (s.engine_logprobs or ())]
    return bool(logprobs) and sum(logprobs) / len(logprobs) > CERTAIN_MEAN_LOGPROB


def warn_if_identical(fraction: float, threshold: float, temperature: float) -> None:
    """A warning when at least `threshold` of a step's groups are identical although sampling is random and the
    policy is not near-certain of their response (`fraction`: identical_group_fraction(..., uncertain_only=True))."""
    if temperature > 0 and fraction >= threshold:
        logger.warning("%.0f%% of this step's groups are copies of one response at temperature %g: their "
                       "advantages are 0 and they teach nothing. Check that every sample has its own seed (SGLang "
                       "with --enable-deterministic-inference answers one seed with one response); threshold: "
                       "rollout.identical_groups_warn", 100 * fraction, temperature)
