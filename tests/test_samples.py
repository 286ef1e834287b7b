"""A scored Sample is the rollout's fixed record: no field can be rebound after it is built; the trainer's
per-sample values live apart in its `trainer` holder, the one writable part, which `replace` carries over."""
from __future__ import annotations

from dataclasses import FrozenInstanceError, fields, replace

import pytest
import torch

from grpo_megatron.replay.delivery import take_engine_routes
from grpo_megatron.samples import Sample, TrainerFields
from grpo_megatron.training.batch import make_micro_batch


def scored(i: int = 0, routes: bool = False) -> Sample:
    sample = Sample(prompt_ids=[1, 2], response_ids=[3 + i, 4], group=0, engine_logprobs=[-0.5, -0.25],
                    routed_experts=torch.zeros(3, 2, 2, dtype=torch.uint8) if routes else None, answer="4")
    return replace(sample, reward=1.0, prompt_index=7, draw=i, weight_versions=[0, 0])


@pytest.mark.parametrize("name", [f.name for f in fields(Sample)])
def test_no_field_of_a_scored_sample_can_be_rebound(name):
    sample = scored()
    with pytest.raises(FrozenInstanceError):
        setattr(sample, name, getattr(sample, name))


@pytest.mark.parametrize("name", [f.name for f in fields(TrainerFields)])
def test_trainer_values_are_written_through_the_trainer_holder_only(name):
    assert name not in {f.name for f in fields(Sample)}
    sample = scored()
    with pytest.raises(FrozenInstanceError):
        setattr(sample, name, None)
    value = torch.full((2,), -1.5) if name not in ("advantage", "in_loss") else 1.5
    setattr(sample.trainer, name, value)
    assert getattr(sample.trainer, name) is value


def test_the_micro_batch_reads_the_trainer_holder():
    samples = [scored(0), scored(1)]
    samples[1].trainer.advantage = -2.0
    samples[1].trainer.old_logprobs = torch.tensor([-1.0, -3.0])
    samples[0].trainer.old_logprobs = torch.tensor([-0.5, -0.5])
    mb = make_micro_batch(samples, [1, 0], pad_id=0)
    assert mb.advantages.tolist() == [-2.0, 0.0]
    assert mb.old_logprobs[0, 1:3].tolist() == [-1.0, -3.0]


def test_taking_the_routes_replaces_each_sample_in_its_list_and_keeps_the_trainer_values():
    samples = [scored(i, routes=True) for i in range(2)]
    holders, originals = [s.trainer for s in samples], list(samples)
    holders[0].advantage = 0.75
    routes = take_engine_routes(samples, num_moe_layers=2, topk=2, num_experts=4, required=True)
    assert routes.problem is None and set(routes.table.routes) == {0, 1}
    assert all(s.routed_experts is None for s in samples), "the routes stay in the broadcast samples"
    assert all(o.routed_experts is not None for o in originals), "the old records were changed in place"
    assert [s.trainer for s in samples] == holders and all(a.trainer is b for a, b in zip(samples, holders))
    assert samples[0].trainer.advantage == 0.75
    assert [replace(o, routed_experts=None) for o in originals] == samples
