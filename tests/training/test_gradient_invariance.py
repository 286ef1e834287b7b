"""The gradient of a step does not depend on how its batch is split: micro-batch sizes, token budgets and
data-parallel ranks (DP=1 vs DP=2) give the same gradient norm and the same clipped gradient.

Gradient clipping is active (the norm is far above `clip_grad`), so the clipped gradients alone would hide
a wrong scale (they all have norm `clip_grad`): the pre-clip norm is compared too. A loss scale that
dropped the DP size, or the number of micro-batches, halves or multiplies it.
"""
import pytest
import torch

from grpo_megatron.config import save_config
from grpo_megatron.training.loop import Trainer
from tests.conftest import run_cli
from tests.training.dist_grads import step_gradients, step_weights

CLIP = 1e-3


def config(make_config, tmp_path, name: str, lr: float = 0.0, **train):
    return make_config(run_dir=str(tmp_path / name), reward={"functions": [{"name": "tests.training.test_loop:varied_reward"}]},
                       algorithm={"loss": "grpo", "clip_low": 0.2, "clip_high": 0.28, "loss_agg": "token_mean",
                                  "kl_coef": 0.05},
                       train={"steps": 1, "num_minibatches": 1, "lr": lr, "clip_grad": CLIP, **train})


def in_process(cfg, weights: bool = False) -> tuple[dict, dict]:
    """(gradients, or with `weights` the weights after the step; the step's metrics)."""
    trainer = Trainer(cfg)
    metrics = trainer.train_step()
    tensors = step_weights(trainer) if weights else step_gradients(trainer)
    trainer.close()
    return tensors, metrics


def assert_same_step(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    (grads_a, metrics_a), (grads_b, metrics_b) = a, b
    assert metrics_a["train/grad_norm"] > 10 * CLIP  # clipping is active
    assert metrics_b["train/grad_norm"] == pytest.approx(metrics_a["train/grad_norm"], rel=1e-5)
    assert metrics_b["train/pg_loss"] == pytest.approx(metrics_a["train/pg_loss"], rel=1e-5, abs=1e-7)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-9, msg=name)


def test_micro_batch_splits_give_the_same_clipped_gradient(make_config, tmp_path, dist_world1):
    whole = in_process(config(make_config, tmp_path, "whole", micro_batch_size=16))
    for name, train in (("split4", {"micro_batch_size": 4}), ("split3", {"micro_batch_size": 3}),
                        ("budget", {"max_tokens_per_microbatch": 30})):
        assert_same_step(whole, in_process(config(make_config, tmp_path, name, **train)))


@pytest.mark.distributed
@pytest.mark.parametrize("distributed_optimizer", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_two_data_parallel_ranks_give_the_single_process_step(distributed_optimizer, make_config, tmp_path, dist_world1):
    """DP=2 against one process. With megatron's distributed optimizer (the GPU default at DP > 1) each rank
    keeps only its reduce-scattered shard of the gradient, so the updated weights (all-gathered after the
    step, lr 1e-3) are compared instead of `main_grad`; the pre-clip norm is compared in both cases."""
    lr = 1e-3 if distributed_optimizer else 0.0
    single = in_process(config(make_config, tmp_path, "dp1", lr=lr, micro_batch_size=4), weights=distributed_optimizer)
    cfg = config(make_config, tmp_path, "dp2", lr=lr, micro_batch_size=4, distributed_optimizer=distributed_optimizer)
    save_config(cfg, tmp_path / "dp2.yaml")
    result = run_cli(["tests/training/dist_grads.py", str(tmp_path / "dp2.yaml"), str(tmp_path / "dp2.pt")], nproc=2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    saved = torch.load(tmp_path / "dp2.pt")
    assert saved["distributed_optimizer"] is distributed_optimizer
    assert_same_step(single, (saved["weights" if distributed_optimizer else "grads"], saved["metrics"]))
