"""The GPU configuration on CPU: bf16 parameters with megatron's fp32 master copies, through the mixed-precision
optimizer (`Float16OptimizerWithFloat16Params`) and the distributed optimizer, which both run on CPU.

fp32 runs have no master copy, so they cannot show a step that writes stale masters back into the model
(megatron-core 0.16.1 `optimizer/optimizer.py`: masters cloned at construction, copied into the model params by
`step_with_ready_grads`); these runs can.
"""
from __future__ import annotations

import pytest
import torch

from grpo_megatron.training.loop import Trainer

OPTIMIZERS = {"float16": False, "distributed": True}


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.learner.policy.chunks[0].named_parameters()}


def _bf16_trainer(make_config, distributed: bool, **train) -> Trainer:
    trainer = Trainer(make_config(model={"dtype": "bfloat16"}, train={
        "steps": 1, "num_minibatches": 1, "distributed_optimizer": distributed, **train}))
    inner = trainer.learner.actor.optimizer.chained_optimizers[0]
    expected = "DistributedOptimizer" if distributed else "Float16OptimizerWithFloat16Params"
    assert type(inner).__name__ == expected
    return trainer


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_zero_lr_rl_step_keeps_the_sft_warm_start(optimizer, make_config, dist_world1):
    trainer = _bf16_trainer(make_config, OPTIMIZERS[optimizer], lr=0.0, sft_warmup_steps=2, sft_lr=3e-2)
    before = _params(trainer)
    trainer.sft_warmup()
    after_sft = _params(trainer)
    moved = max(float((after_sft[n].float() - before[n].float()).abs().max()) for n in before)
    assert moved > 1e-3, "the warm start did not change the model"
    assert trainer.learner.actor.lr == 0.0, "the RL schedule's learning rate is not back after the warm start"
    assert not any(w.optimizer.state for w in trainer.learner.actor.optimizer.chained_optimizers), "SFT's Adam moments kept"
    trainer.train_step()
    for name, value in _params(trainer).items():
        torch.testing.assert_close(value, after_sft[name], rtol=0, atol=0, msg=name)
    trainer.close()


def _masters_in_sync(optimizer) -> None:
    """Every bf16 model parameter (its shard, for the distributed optimizer) is its fp32 master rounded: the
    pairs megatron itself copies in `_copy_main_params_to_model_params` (optimizer.py, distrib_optimizer.py)."""
    for wrapper in optimizer.chained_optimizers:
        model_data, main_data = wrapper._get_model_and_main_params_data_float16()
        assert model_data and all(m.dtype == torch.bfloat16 for m in model_data)
        for model, main in zip(model_data, main_data):
            assert main.dtype == torch.float32
            torch.testing.assert_close(model, main.to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_bf16_rl_steps_update_the_model_through_fp32_masters(optimizer, make_config, dist_world1):
    from tests.training.test_loop import VARIED

    trainer = Trainer(make_config(model={"dtype": "bfloat16"}, reward=VARIED, train={
        "steps": 2, "num_minibatches": 2, "lr": 1e-2, "distributed_optimizer": OPTIMIZERS[optimizer]}))
    start = _params(trainer)
    for _ in range(2):
        metrics = trainer.train_step()
        assert metrics["train/update_skipped"] == 0.0
        assert 0 < metrics["train/grad_norm"] < float("inf")
    trainer.close()
    after = _params(trainer)
    assert all(p.dtype == torch.bfloat16 for p in after.values())
    changed = [n for n in start if not torch.equal(start[n], after[n])]
    assert len(changed) > len(start) // 2, f"only {len(changed)} of {len(start)} parameters changed"
    _masters_in_sync(trainer.learner.actor.optimizer)
    # the engine generated step 2 from the pushed bf16 weights: the trainer's log-probs agree with its own
    assert metrics["train_rollout/logprob_abs_diff"] < 1e-2
