"""Enter and leave the simulation: the process-wide patches, and `fake_gpu_rank`, the context in which this process
is one rank of a GPU job (fake CUDA tensors, a fake world, megatron's process groups)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from grpo_megatron.simulation import collectives, fake_cuda, shim
from grpo_megatron.simulation.memory import DeviceMemoryCounter

_INSTALLED: list[bool] = []


class SimulationMode(fake_cuda.IntDeviceMode):
    """IntDeviceMode, and torch.tensor of CUDA scalars without reading them."""

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        if func is torch.tensor and args and _all_cuda_tensors(args[0]):
            # torch.tensor of (nested lists of) CUDA scalars reads each value (megatron's local l2 norm): the
            # same tensor, built without reading them; on the CPU unless `device` says otherwise, as on a GPU
            kwargs = kwargs or {}
            with torch.no_grad():
                stacked = _stack(args[0])
            return stacked.to(device=fake_cuda._cuda_device(kwargs.get("device") or "cpu"),
                              dtype=kwargs.get("dtype") or stacked.dtype)
        return super().__torch_function__(func, types_, args, kwargs)


def _all_cuda_tensors(data) -> bool:
    if isinstance(data, torch.Tensor):
        return data.device.type == "cuda" and data.dim() == 0
    return isinstance(data, (list, tuple)) and len(data) > 0 and all(_all_cuda_tensors(d) for d in data)


def _stack(data) -> torch.Tensor:
    return data if isinstance(data, torch.Tensor) else torch.stack([_stack(d) for d in data])


_SDPA = F.scaled_dot_product_attention


def _flash_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                     enable_gqa=False):
    """SDPA on CUDA pinned to the flash kernel: fake mode would take SDPA's math path, which stores the
    [b, heads, s, s] scores that the fused kernel a GPU job runs never allocates. A patch of the function, not a
    TorchFunctionMode: a checkpointed layer's recompute runs on the autograd engine's device thread, which the
    mode does not reach."""
    if query.device.type != "cuda":
        return _SDPA(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    if attn_mask is not None:
        raise NotImplementedError("the simulation pins SDPA's flash kernel, which takes no attention mask")
    return torch.ops.aten._scaled_dot_product_flash_attention.default(
        query, key, value, dropout_p, is_causal, False, scale=scale)[0]


def install() -> None:
    """The process-wide patches (idempotent). Call before anything builds a model."""
    if _INSTALLED:
        return
    from torch._subclasses.fake_tensor import FakeTensorMode

    from grpo_megatron import platform

    if platform.cpu_shims_applied():
        raise RuntimeError("the CPU shims are applied in this process: they would hide CUDA's rules; "
                           "simulate in a fresh interpreter")
    fake_cuda.fake_cuda_queries()
    fake_cuda.rng_tracker_no_ops()
    fake_cuda.placeholder_scalars()
    fake_cuda.object_collectives_echo()
    fake_cuda.storage_data_pointers()
    collectives.register_coalesced_fake_kernels()
    collectives.gloo_groups_become_fake()
    torch.nn.Module._apply = fake_cuda.apply_recreates
    F.scaled_dot_product_attention = _flash_attention
    # torch.cuda.is_available() now answers True, which would let fake mode make real CUDA tensors (megatron's
    # torch.tensor([...], device="cuda") in optimizer.py); a CPU build has none to make.
    FakeTensorMode.avoid_device_init = property(lambda self: True)
    # megatron's jit_fuser is torch.compile, whose tracing asks the (absent) accelerator for a stream: run eagerly
    torch._dynamo.config.disable = True
    platform.detect.cache_clear()
    _INSTALLED.append(True)


@contextlib.contextmanager
def fake_gpu_rank(rank: int, world_size: int, memory: DeviceMemoryCounter | None = None, *,
                  require_shim: bool = False):
    """Run the body as rank `rank` of `world_size` GPUs under CUDA's rules, with `memory` counting device bytes.

    `require_shim`: refuse to run without the C++ shim (autograd and megatron's DDP need it; building a model
    and forward-only passes do not)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from grpo_megatron import parallel, platform

    if require_shim:
        shim.require_loaded()
    install()
    platform.setup_platform()  # on "CUDA" without TransformerEngine: megatron's local spec fixes
    collectives.init_fake_world(rank, world_size)
    parallel.init_control_group(timeout_minutes=1.0)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), SimulationMode():
            with memory if memory is not None else contextlib.nullcontext():
                yield
    finally:
        parallel.destroy()
