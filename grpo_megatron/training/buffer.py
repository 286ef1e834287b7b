"""The buffer between the rollout side and the training side: scored groups, oldest first.

A group is the G samples of one prompt draw, with the metrics of the rollout batch ("chunk") it came
from. Its age is counted in weight versions: a group whose oldest token was sampled under version v is
`version - v` behind a trainer at `version`. The buffer is what a checkpoint must carry for a resume to
lose nothing, so it serialises to JSON exactly (floats round-trip through repr).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from grpo_megatron.samples import Sample

_SAMPLE_FIELDS = ("prompt_ids", "response_ids", "group", "reward", "truncated", "engine_logprobs", "answer",
                  "meta", "weight_versions", "prompt_index", "draw")


@dataclass
class Group:
    samples: list[Sample]
    chunk_metrics: dict = field(default_factory=dict)  # the rollout metrics of the batch it was generated in

    @property
    def oldest_version(self) -> int:
        return min(min(s.weight_versions or [0], default=0) for s in self.samples)

    @property
    def draw(self) -> int:
        return self.samples[0].draw

    def staleness(self, version: int) -> int:
        return version - self.oldest_version


class RolloutBuffer:
    """FIFO of groups shared by the rollout thread (put) and the trainer (take); thread-safe.

    It also counts the groups taken for training, so that `committed` (taken + buffered) moves atomically
    with every take: the rollout side's staleness gate must never see a group in neither place."""

    def __init__(self):
        self._groups: list[Group] = []
        self._taken = 0
        self._changed = threading.Condition()

    def __len__(self) -> int:
        with self._changed:
            return len(self._groups)

    def put(self, groups: list[Group]) -> None:
        with self._changed:
            self._groups.extend(groups)
            self._changed.notify_all()

    def take(self, count: int, ready=lambda: True, timeout: float = 1.0) -> list[Group] | None:
        """The `count` oldest groups, or None when `ready()` turns false while waiting (checked every timeout)."""
        with self._changed:
            while len(self._groups) < count:
                if not ready():
                    return None
                self._changed.wait(timeout)
            taken, self._groups = self._groups[:count], self._groups[count:]
            self._taken += count
            return taken

    def give_back(self, count: int) -> None:
        """Taken groups the trainer will not train (too stale): no longer committed."""
        with self._changed:
            self._taken -= count

    def committed(self) -> int:
        """Groups taken for training plus groups waiting here."""
        with self._changed:
            return self._taken + len(self._groups)

    @property
    def taken(self) -> int:
        with self._changed:
            return self._taken

    def state_dict(self) -> list[dict]:
        with self._changed:
            return [group_to_dict(g) for g in self._groups]

    def load_state_dict(self, state: list[dict], taken: int) -> None:
        with self._changed:
            self._groups = [group_from_dict(g) for g in state]
            self._taken = taken


def group_to_dict(group: Group) -> dict:
    return {"samples": [sample_to_dict(s) for s in group.samples], "chunk_metrics": group.chunk_metrics}


def group_from_dict(state: dict) -> Group:
    return Group([sample_from_dict(s) for s in state["samples"]], state["chunk_metrics"])


def sample_to_dict(sample: Sample) -> dict:
    """A generated, scored sample as JSON values (routes as nested lists with their dtype)."""
    state = {name: getattr(sample, name) for name in _SAMPLE_FIELDS}
    routes = sample.routed_experts
    if routes is not None:
        routes = torch.as_tensor(routes)
        state["routed_experts"] = {"dtype": str(routes.dtype).removeprefix("torch."), "values": routes.tolist()}
    return state


def sample_from_dict(state: dict) -> Sample:
    state = dict(state)
    routes = state.pop("routed_experts", None)
    if routes is not None:
        routes = torch.tensor(routes["values"], dtype=getattr(torch, routes["dtype"]))
    return Sample(**state, routed_experts=routes)


def staleness_metrics(groups: list[Group], version: int, depth: int) -> dict:
    """Per step: versions behind (mean over samples, max), buffer depth left, and how many trained tokens
    belong to responses sampled under more than one version (partial rollouts across a weight update)."""
    samples = [s for g in groups for s in g.samples]
    behind = torch.tensor([float(version - min(s.weight_versions or [version])) for s in samples])
    mixed = [s for s in samples if s.weight_versions and len(set(s.weight_versions)) > 1]
    return {"async/staleness_mean": float(behind.mean()), "async/staleness_max": float(behind.max()),
            "async/buffer_groups": depth, "async/multi_version_samples": len(mixed),
            "async/multi_version_tokens": sum(len(s.response_ids) for s in mixed)}
