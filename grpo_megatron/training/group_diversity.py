"""Groups whose samples are all the same response: at temperature > 0 the sign of a shared sampling seed.

A server that seeds its sampler per request (SGLang with --enable-deterministic-inference) answers every sample
that carries the same seed with the same tokens; every advantage of such a group is 0 and the step learns
nothing, with no error anywhere. The metric `rollout/identical_groups` and a loud warning make that visible.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

from grpo_megatron.samples import Sample

logger = logging.getLogger(__name__)


def identical_group_fraction(samples: Sequence[Sample], group_size: int) -> float:
    """The fraction of the groups (consecutive runs of group_size samples) whose responses are all equal."""
    groups = [samples[i:i + group_size] for i in range(0, len(samples), group_size)]
    same = sum(1 for g in groups if len(g) > 1 and all(s.response_ids == g[0].response_ids for s in g[1:]))
    return same / max(len(groups), 1)


def warn_if_identical(fraction: float, threshold: float, temperature: float) -> None:
    """A warning when at least `threshold` of a step's groups are identical although sampling is random."""
    if temperature > 0 and fraction >= threshold:
        logger.warning("%.0f%% of this step's groups are copies of one response at temperature %g: their "
                       "advantages are 0 and they teach nothing. Check that every sample has its own seed (SGLang "
                       "with --enable-deterministic-inference answers one seed with one response); threshold: "
                       "rollout.identical_groups_warn", 100 * fraction, temperature)
