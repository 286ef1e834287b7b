"""A process group of any world size in one process: `cuda:fake` on torch's FakeStore, with megatron's gloo
groups as `fake` groups, and fake kernels for the coalesced collectives megatron's DDP buckets use.

Collectives move no data; they check devices and backends as NCCL would (a CPU tensor in a `cuda:fake`
collective raises), and return outputs of the right shapes.
"""
from __future__ import annotations

import importlib

import torch
import torch.distributed as dist

_REGISTERED: list = []


def _fake_work(*_args):
    from torch._C._distributed_c10d import FakeWork

    return FakeWork().boxed()


def register_coalesced_fake_kernels() -> None:
    """Meta kernels for the coalesced c10d ops, which torch leaves out (`torch/distributed/_meta_registrations.py`
    lists them as deprecated) and megatron's bucketed grad reduce-scatter and param all-gather call
    (`distributed/param_and_grad_buffer.py`, `_coalescing_manager`). Each returns a completed work handle: the
    outputs are the caller's preallocated tensors."""
    if _REGISTERED:
        return
    importlib.import_module("torch.distributed._meta_registrations")  # torch's own fake kernels first

    library = torch.library.Library("c10d", "IMPL")
    for op in ("allgather_into_tensor_coalesced_", "reduce_scatter_tensor_coalesced_", "allreduce_coalesced_",
               "allgather_coalesced_"):
        library.impl(op, _fake_work, "Meta")
    _REGISTERED.append(library)


def gloo_groups_become_fake() -> None:
    """megatron's `new_group(backend="gloo")` fails on FakeStore ("Not implemented" in ProcessGroupGloo): make
    those groups `fake` (CPU-capable, as gloo is on a GPU machine); every other group inherits `cuda:fake`."""
    original = dist.new_group
    if getattr(original, "_fake_world", False):
        return

    def new_group(*args, **kwargs):
        if kwargs.get("backend") == "gloo":
            kwargs["backend"] = "fake"
        return original(*args, **kwargs)

    new_group._fake_world = True
    dist.new_group = new_group
    dist.distributed_c10d.new_group = new_group


def init_fake_world(rank: int, world_size: int) -> None:
    """This process becomes rank `rank` of `world_size` (replacing any default group it had)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}: use 0..{world_size - 1}")
    register_coalesced_fake_kernels()
    gloo_groups_become_fake()
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("cuda:fake", store=FakeStore(), rank=rank, world_size=world_size)
