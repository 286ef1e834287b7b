"""CUDA's rules on a CPU-only machine, for the gpu_semantics checks: the package's fake-CUDA simulation.

`fake_gpu_rank(rank, world_size)` makes this process pretend to be rank `rank` of `world_size` GPUs
(`grpo_megatron/simulation/`): `torch.cuda` answers as a one-GPU machine would, tensors are `FakeTensor`s (a CPU
tensor meeting a CUDA tensor raises `FakeTensorDeviceMismatchError`, as on a GPU), the default process group is
`cuda:fake` (a CPU tensor in its collectives raises, as with NCCL) and megatron's gloo groups are `fake`.
With the C++ shim preloaded (`simulation.shim.preload_env`), autograd, megatron's DDP and its optimizers run too.

Values are placeholders: `.item()` of a fake tensor answers 1 (False for bools). The mode checks placement,
backends and shapes; the CPU tests check values. It must run in a process that never applied
`platform.apply_cpu_shims` (they map CUDA to the CPU and would hide every mismatch).
"""
from __future__ import annotations

from grpo_megatron.simulation.fake_cuda import SYNCS, placeholder_bools
from grpo_megatron.simulation.runtime import fake_gpu_rank, install

__all__ = ["SYNCS", "fake_gpu_rank", "install", "placeholder_bools"]
