"""Host memory of the busiest trainer node (the one with rank 0), per step and while a checkpoint is saved.

Every rank holds the step's samples as Python objects (rank 0 broadcasts the whole batch to all of them) and
rank 0, with routing replay, every sample's routes. Every rank holds its process baseline, its offloaded
optimizer state (pinned; training/offload.py frees the grad buffers without a copy) and, while saving, a host
copy of its checkpoint shard (megatron's torch_dist save strategy stages each rank's tensors to CPU before
writing) instead of the offloaded copy (the state is taken back first).
"""
from __future__ import annotations

import random
import sys
from dataclasses import dataclass

from grpo_megatron.plan import constants
from grpo_megatron.plan.trainer_rank import TrainerRank


@dataclass(frozen=True)
class HostNeeds:
    parts: dict[str, int]
    save_parts: dict[str, int]  # added while a checkpoint is being saved
    released_for_save: int = 0  # host copies given back while saving (the trainer takes its state back first)

    @property
    def steady(self) -> int:
        return sum(self.parts.values())

    @property
    def saving(self) -> int:
        return self.steady - self.released_for_save + sum(self.save_parts.values())


def python_bytes_per_token(vocab: int, with_logprobs: bool, seed: int = 0) -> float:
    """Measured: bytes a response token costs in a Sample's Python lists (an int object per id above the
    small-int cache, a float object per engine log-prob, and the list slots), ids drawn over the vocabulary."""
    rng = random.Random(seed)
    ids = [rng.randrange(vocab) for _ in range(4096)]
    size = sys.getsizeof(ids) + sum(sys.getsizeof(i) for i in ids if i > 256)
    if with_logprobs:
        logprobs = [-rng.random() for _ in range(4096)]
        size += sys.getsizeof(logprobs) + sum(sys.getsizeof(x) for x in logprobs)
    return size / 4096


def rank0_node(ranks_on_node: list[TrainerRank], *, samples: int, sequence: int, vocab: int, with_logprobs: bool,
               route_bytes_total: int, reference_offloaded: bool, train_state_offloaded: bool) -> HostNeeds:
    """The node of rank 0, whose trainer ranks are `ranks_on_node` (one TrainerRank per process)."""
    per_token = python_bytes_per_token(vocab, with_logprobs)
    parts = {
        "process baselines": constants.PER_PROCESS_HOST_BYTES * len(ranks_on_node),
        "step samples (whole batch, every rank)": int(samples * sequence * per_token) * len(ranks_on_node),
        "rank 0: R3 routes": route_bytes_total,
        "OS and staging reserve": constants.HOST_RESERVE_BYTES,
    }
    if reference_offloaded:
        parts["offloaded reference models"] = sum(r.param_bytes for r in ranks_on_node)
    offloaded = 0
    if train_state_offloaded:  # grad buffers are freed, not copied: their content is dead between steps
        offloaded = parts["offloaded optimizer state + masters"] = sum(r.optimizer_bytes for r in ranks_on_node)
    save = {"checkpoint staging": sum(r.param_bytes + r.optimizer_bytes for r in ranks_on_node)}
    return HostNeeds(parts, save, offloaded)
