"""The engine interface's defaults (rollout/engines/base.py): what the trainer calls on any engine works on one that only
implements generate / update_weights, so training/ needs no isinstance or getattr checks."""
from __future__ import annotations

import torch

from grpo_megatron.models.weight_stream import pack, plain_alloc
from grpo_megatron.rollout.engines.base import RolloutEngine


class RecordingEngine(RolloutEngine):
    """The smallest engine: keeps what update_weights receives."""

    def __init__(self):
        self.received: dict[str, torch.Tensor] = {}
        self._version = 0

    def generate(self, prompts, params, return_routed_experts=False):
        raise NotImplementedError

    def update_weights(self, named_tensors, version):
        self.received = {name: t.clone() for name, t in named_tensors}
        self._version = version

    @property
    def weight_version(self) -> int:
        return self._version

    def shutdown(self) -> None:
        pass


def test_pushed_buckets_reach_update_weights_whole():
    weights = {f"layer{i}.weight": torch.randn(3, 5) for i in range(4)}
    engine = RecordingEngine()
    buckets = list(pack(weights.items(), bucket_bytes=2 * 3 * 5 * 4, alloc=plain_alloc))
    assert len(buckets) > 1
    engine.push_buckets(iter(buckets), version=7, complete=True, verify=False)
    assert engine.weight_version == 7 and engine.received.keys() == weights.keys()
    assert all(torch.equal(engine.received[k], v) for k, v in weights.items())


def test_defaults_need_no_capability_checks():
    engine = RecordingEngine()
    assert engine.serves_last_push() and engine.to_every_rank is False and engine.bucket_alloc is None
    engine.release_memory()
    engine.verify_push()
    assert engine.sync_metrics() == {}
