"""One RL step under torchrun; rank 0 saves the gradients megatron left in `main_grad`, the weights after the
step, and the step's metrics.

    torchrun --nproc-per-node 2 tests/training/dist_grads.py RUN.yaml OUT.pt

With `train.lr: 0` the weights stay put, so `main_grad` after the step is the (clipped) gradient of the
step's loss at the initial weights; every data-parallel replica holds the same one after the all-reduce.
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from grpo_megatron.config import load_config
from grpo_megatron.training.actor import uses_distributed_optimizer
from grpo_megatron.training.loop import Trainer


def step_gradients(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.main_grad.detach().cpu().clone() for n, p in trainer.learner.policy.unwrapped()[0].named_parameters()}


def step_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in trainer.learner.policy.unwrapped()[0].named_parameters()}


def main(config_path: str, out: str) -> None:
    trainer = Trainer(load_config(config_path))
    metrics = trainer.train_step()
    if dist.get_rank() == 0:
        torch.save({"grads": step_gradients(trainer), "weights": step_weights(trainer), "metrics": metrics,
                    "distributed_optimizer": uses_distributed_optimizer(trainer.learner.policy)}, out)
    trainer.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
