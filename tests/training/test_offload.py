"""Trainer memory around generation with colocated GPU servers (training/offload.py), on CPU in bf16 with
megatron's mixed-precision and distributed optimizers: after offload the device storage of grad buffers,
optimizer state, fp32 masters (and params, when asked) is released; after onload everything is bit-identical
and training goes on exactly as without the round trip."""
from __future__ import annotations

import pytest
import torch

from grpo_megatron.config import TrainConfig
from grpo_megatron.models import build_model, model_dims
from grpo_megatron.models.tiny import tiny_hf_config
from grpo_megatron.parallel import ParallelLayout, init_model_parallel
from grpo_megatron.platform import setup_platform
from grpo_megatron.training.actor import Actor
from grpo_megatron.training.batch import make_micro_batches
from grpo_megatron.training.offload import TrainStateOffload, _optimizer_tensors
from tests.training.test_actor import gspo, rollout


def _actor(distributed: bool, dtype=torch.bfloat16) -> Actor:
    setup_platform()
    config = tiny_hf_config("qwen3_moe")
    init_model_parallel(ParallelLayout(), seed=0, **model_dims(config))
    torch.manual_seed(0)
    policy = build_model(config, ParallelLayout(), dtype, wrap_ddp=True,
                         ddp_overrides={"use_distributed_optimizer": distributed})
    return Actor(policy, TrainConfig(steps=10, num_minibatches=1, lr=1e-2, clip_grad=1.0), total_steps=10)


def _step(actor: Actor) -> None:
    batch = rollout()
    actor.train_step(make_micro_batches(batch, list(range(len(batch))), 4, 0), gspo(len(batch)), 1.0)


def _params(actor: Actor) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in actor.model.chunks[0].named_parameters()}


def _grad_buffers(actor: Actor) -> list[torch.Tensor]:
    chunk = actor.model.chunks[0]
    return [b.grad_data for b in chunk.buffers + chunk.expert_parallel_buffers]


@pytest.mark.parametrize("distributed, dtype", [(False, torch.bfloat16), (True, torch.bfloat16), (True, torch.float32)],
                         ids=["float16", "distributed", "distributed-fp32"])
def test_offload_releases_and_onload_restores_bit_identically(distributed, dtype, dist_world1):
    """fp32: the distributed optimizer's main params are views of the model's param buffer, which stays for the
    weight push when only optimizer state and grads go."""
    plain = _actor(distributed, dtype)
    for _ in range(3):
        _step(plain)
    expected = _params(plain)

    actor = _actor(distributed, dtype)
    _step(actor)
    params = _params(actor)
    state = [t.clone() for t in _optimizer_tensors(actor.optimizer)]
    assert len(state) > len(params), "no Adam state yet"
    offload = TrainStateOffload(actor.model.chunks, actor.optimizer, offload_params=True)
    offload.offload()
    offload.offload()  # a second call changes nothing
    assert all(t.untyped_storage().nbytes() == 0 for t in _grad_buffers(actor))
    assert all(t.untyped_storage().nbytes() == 0 for t in _optimizer_tensors(actor.optimizer))
    assert all(p.untyped_storage().nbytes() == 0 for p in actor.model.chunks[0].parameters())
    offload.onload()
    for name, value in _params(actor).items():
        torch.testing.assert_close(value, params[name], rtol=0, atol=0, msg=name)
    for before, after in zip(state, _optimizer_tensors(actor.optimizer)):
        torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert all(t.untyped_storage().nbytes() > 0 and not t.any() for t in _grad_buffers(actor))

    _step(actor)
    offload.offload_optimizer_and_grads()  # before a weight push: the params stay
    assert all(p.untyped_storage().nbytes() > 0 for p in actor.model.chunks[0].parameters())
    assert all(t.untyped_storage().nbytes() == 0 for t in _grad_buffers(actor))
    offload.onload()
    _step(actor)
    for name, value in _params(actor).items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)



def test_trainer_steps_with_offload_around_generation_match_steps_without(make_config, dist_world1):
    """The trainer's boundaries (training/loop.py): state off before generation, back before the update, optimizer
    state and grads off before the weight push, all back for a checkpoint. Colocated GPU servers turn it on; here
    the embedded engine stands in for them, and the steps must equal a run that never offloads."""
    from grpo_megatron.training.loop import Trainer
    from grpo_megatron.training.offload import GenerationMemory
    from tests.training.test_loop import VARIED

    def run(offloading: bool) -> tuple[dict, Trainer]:
        trainer = Trainer(make_config(model={"dtype": "bfloat16"}, reward=VARIED, train={"steps": 2, "lr": 1e-2}))
        assert trainer.learner.memory.offload is None  # embedded engine: nothing shares the device
        if offloading:
            trainer.learner.memory = GenerationMemory(trainer.learner.policy.chunks, trainer.learner.actor.optimizer, active=True,
                                              offload_params=True)
        for _ in range(2):
            trainer.train_step()
        if offloading:  # a checkpoint reads the optimizer state: back first
            assert all(t.untyped_storage().nbytes() == 0 for t in _optimizer_tensors(trainer.learner.actor.optimizer))
            trainer.save_checkpoint()
        trainer.close()
        return {n: p.detach().clone() for n, p in trainer.learner.policy.chunks[0].named_parameters()}, trainer

    expected, _ = run(offloading=False)
    got, trainer = run(offloading=True)
    for name, value in got.items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)
    assert all(t.untyped_storage().nbytes() > 0 for t in _optimizer_tensors(trainer.learner.actor.optimizer))


def test_background_rollouts_with_colocated_gpu_servers_are_refused(make_config):
    from grpo_megatron.config import ConfigError

    with pytest.raises(ConfigError, match="rollout.mode=async generates while the trainer trains"):
        make_config(rollout={"engine": "sglang", "mode": "async", "sglang": {
            "urls": ["http://127.0.0.1:1"], "colocated": True, "gpu_servers": True}},
            algorithm={"loss": "gspo", "rollout_correction": {"mode": "tis"}})
