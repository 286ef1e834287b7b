"""A weight sync as every trainer rank runs it: the policy streamed in buckets to whoever sends them on.

Rank 0 holds the engine; with colocated tensor-mode servers every rank also sends (its own copy for the server
TP rank on its GPU), so it gets a sender of its own (rollout.factory.rank_sender). No rank materialises the model
(see grpo_megatron.models.weight_stream for the memory bound). With rollout.sglang.sync_changed_only a sync streams
only the tensors whose parameters changed since the last one (grpo_megatron.models.weight_changes), after a full
first sync in every process and whenever rank 0's engine finds a server not holding its last push.
"""
from __future__ import annotations

from grpo_megatron.config import RolloutConfig
from grpo_megatron.models.provider import PolicyModel
from grpo_megatron.models.weight_changes import ChangeTracker
from grpo_megatron.models.weight_stream import hf_buckets, plain_alloc
from grpo_megatron.ranks import is_rank0
from grpo_megatron.rollout.engines.base import RolloutEngine
from grpo_megatron.rollout.factory import bucket_bytes, rank_sender


class WeightPush:
    """`hf_path`: the policy's HF checkpoint, whose names and config the pushed weights follow."""

    def __init__(self, rollout: RolloutConfig, hf_path: str, engine: RolloutEngine | None):
        s = rollout.sglang
        self.engine = engine
        self.bucket_bytes = bucket_bytes(s.bucket_mb)
        # ranks 1..N send only to colocated tensor-mode servers
        self.sender = rank_sender(rollout, hf_path) if engine is None else None
        if engine is not None:
            self.to_every_rank, self.alloc = engine.to_every_rank, engine.bucket_alloc or plain_alloc
        else:
            self.to_every_rank = self.sender is not None and self.sender.to_every_rank
            self.alloc = self.sender.alloc if self.sender is not None else plain_alloc
        self.changes = ChangeTracker() if rollout.engine == "sglang" and s.sync_changed_only else None

    def run(self, model: PolicyModel, version: int, verify: bool = True) -> None:
        """Every rank calls this (the export's collectives); the engine ends with weights `version`.
        `verify=False` leaves the engine's post-sync check to a later engine.verify_push()."""
        only = None
        if self.changes is not None:
            only = self.changes.select(model, full=self.engine is not None and not self.engine.serves_last_push())
        buckets = hf_buckets(model, self.bucket_bytes, self.to_every_rank, self.alloc, only)
        if self.engine is not None:
            self.engine.push_buckets(buckets, version, complete=only is None, verify=verify)
        elif self.sender is not None:
            self.sender.push_buckets(buckets, version)
        else:
            for _ in buckets:
                pass
        if self.changes is not None:
            self.changes.commit()


def release_rollout_memory(engine: RolloutEngine | None) -> None:
    """Colocated GPU servers give their memory back for training; the next push takes it again."""
    if engine is not None and is_rank0():
        engine.release_memory()
