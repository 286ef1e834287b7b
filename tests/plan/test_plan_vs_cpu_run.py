"""The plan against a real run: the tiny MoE config planned on fake CUDA, and the same rank built and stepped for
real on this CPU by the trainer's own code (training/builder.py's build_policy_model, Actor.train_step), with every live CPU tensor
storage counted. Parameters, grad buffers and optimizer state must agree within 2%; the simulated activation
peak must be within ACTIVATION_MARGIN of the CPU run's measured one (the CPU run computes attention with
torch's CPU kernels where the simulation pins the GPU's flash kernel, and the MoE dispatch sees real routes
where the simulation uses balanced routing times constants.ROUTING_SKEW)."""
from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from grpo_megatron.plan.cli import build_parser, load_job
from grpo_megatron.plan.planner import make_plan
from grpo_megatron.plan.simulate import CachedSimulator

REPO = Path(__file__).resolve().parents[2]
ARGS = ["--config", str(REPO / "slurm/configs/tiny_cpu.yaml"), "--nodes", "1", "--gpus-per-node", "1",
        "--gpu-memory", "80GiB", "--prompt-tokens", "4", "--model.dtype", "bfloat16",
        "--rollout.max_new_tokens", "508", "--train.micro_batch_size", "2", "--train.num_minibatches", "8"]
ACTIVATION_MARGIN = 0.35


class CpuStorageCounter(TorchDispatchMode):
    """Live and peak bytes of CPU tensor storages created by ops while active (each storage once)."""

    def __init__(self):
        super().__init__()
        self.current = self.peak = 0
        self.seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self.seen.discard(key)
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor) and value.device.type == "cpu":
                storage = value.untyped_storage()
                if storage._cdata not in self.seen and storage.nbytes():
                    self.seen.add(storage._cdata)
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, storage._cdata, storage.nbytes())
        return out


def _storage_bytes(tensors) -> int:
    unique = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors if t is not None}
    return sum(unique.values())


@pytest.fixture(scope="module")
def planned():
    args, overrides = build_parser().parse_known_args(ARGS)
    job = load_job(args, overrides)
    return job, make_plan(job, CachedSimulator())


def test_plan_matches_the_bytes_of_a_real_cpu_run(planned, dist_world1):
    from grpo_megatron.models import model_dims
    from grpo_megatron.models.mcore_checkpoint import dtype_from_name
    from grpo_megatron.models.provider import load_hf_config
    from grpo_megatron.parallel import init_model_parallel
    from grpo_megatron.platform import setup_platform
    from grpo_megatron.training.actor import Actor
    from grpo_megatron.samples import Sample, TrainerFields
    from grpo_megatron.training.batch import make_micro_batches
    from grpo_megatron.training.builder import build_policy_model
    from tests.training.test_actor import gspo

    job, plan = planned
    cfg = job.cfg
    setup_platform()
    hf = load_hf_config(cfg.model.hf_path)
    init_model_parallel(cfg.parallel, seed=0, **model_dims(hf))
    torch.manual_seed(0)
    policy = build_policy_model(cfg, hf, dtype_from_name(cfg.model.dtype), wrap_ddp=True)
    actor = Actor(policy, cfg.train, total_steps=1)
    samples = [Sample(prompt_ids=[1] * 4, response_ids=[5] * (job.sequence - 4), group=i,
                      trainer=TrainerFields(advantage=1.0))
               for i in range(job.micro_batch_rows)]
    micro = make_micro_batches(samples, list(range(len(samples))), job.micro_batch_rows, 0)
    actor.train_step(micro, gspo(len(samples)), 1.0)  # Adam's state exists after a first step
    gc.collect()
    params = [p for chunk in policy.chunks for p in chunk.parameters()]
    state = [v for opt in actor.optimizer.chained_optimizers for s in opt.optimizer.state.values()
             for v in s.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    mains = [p for opt in actor.optimizer.chained_optimizers for g in opt.optimizer.param_groups for p in g["params"]]
    real = {"params": _storage_bytes(params), "grads": _storage_bytes(p.main_grad for p in params),
            "optimizer": _storage_bytes(state) + _storage_bytes(mains)}
    (rank,) = plan.ranks
    simulated = {"params": rank.rank.param_bytes, "grads": rank.rank.grad_bytes, "optimizer": rank.rank.optimizer_bytes}
    for key in real:
        assert simulated[key] == pytest.approx(real[key], rel=0.02), (key, simulated, real)

    counter = CpuStorageCounter()
    gc.collect()
    with counter:
        actor.train_step(micro, gspo(len(samples)), 1.0)
    measured_activations = counter.peak
    simulated_activations = rank.rank.activation_bytes
    print(f"activation peak: simulated {simulated_activations} B, CPU run {measured_activations} B")
    assert simulated_activations == pytest.approx(measured_activations, rel=ACTIVATION_MARGIN)
