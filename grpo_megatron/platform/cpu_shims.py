"""CPU-only shims: megatron-core's CUDA assumptions mapped to the CPU and gloo. Never applied on a GPU.

megatron-core assumes CUDA throughout (``torch.cuda.current_device()`` at ~80 call sites, CUDA streams,
CUDA RNG tracker, ``device="cuda"`` literals). :func:`apply_cpu_shims` patches exactly those spots so that its
GPTModel, pipeline schedules, DDP and optimizer run on CPU with gloo; the module list below is the same
for megatron-core 0.16.1 and 0.19.2 (a release that drops one fails at start-up, naming it).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import types

import torch

from grpo_megatron.platform.device import has_cuda

logger = logging.getLogger(__name__)

_APPLIED = False


def cpu_shims_applied() -> bool:
    return _APPLIED


class _NullStream:
    """Stands in for torch.cuda.Stream/Event: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def __eq__(self, other):
        return isinstance(other, _NullStream)

    def __hash__(self):
        return 0

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NullStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, *args):
        return 0.0


class _CpuDeviceTorch(types.ModuleType):
    """A view of the torch module whose tensor factories map device="cuda" to the CPU.

    Installed as the ``torch`` global of the few megatron modules that hard-code ``device="cuda"``.
    """

    _FACTORIES = ("zeros", "ones", "empty", "tensor", "full", "arange", "zeros_like", "empty_like")

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in self._FACTORIES:
            return functools.partial(_on_cpu, attr)
        return attr


def _on_cpu(factory, *args, **kwargs):
    device = kwargs.get("device")
    if device is not None and str(device).startswith("cuda"):
        kwargs["device"] = "cpu"
    return factory(*args, **kwargs)


def _maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
    # megatron only converts split sizes to numpy when they are CUDA tensors; alltoall needs the list.
    if torch.is_tensor(tensor):
        tensor = tensor.detach().cpu()
        if as_numpy:
            return tensor.numpy()
    return tensor


def apply_cpu_shims() -> None:
    """Patch megatron-core's CUDA assumptions for CPU/gloo. Idempotent; no-op when CUDA is present."""
    global _APPLIED
    if _APPLIED or has_cuda():
        return
    cuda = torch.cuda
    # Megatron allocates with device=torch.cuda.current_device() everywhere: make that the CPU.
    cuda.current_device = lambda: torch.device("cpu")
    # Streams and events order GPU work; on CPU everything is already sequential.
    cuda.Stream = _NullStream
    cuda.Event = _NullStream
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.nvtx.range_push = lambda *a, **k: None
    cuda.nvtx.range_pop = lambda *a, **k: None
    # Memory statistics are logged by megatron's timers/optimizer; report zero instead of raising.
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.reset_peak_memory_stats = lambda *a, **k: None

    # The model-parallel RNG tracker keeps CUDA generator states; keep CPU generator states instead.
    from megatron.core.tensor_parallel import random as mp_random

    mp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(seed)

    # device="cuda" literals: token counts, grad clipping, loss scaling, causal masks, checkpoint checks.
    cpu_torch = _CpuDeviceTorch()
    for name in (
        "megatron.core.pipeline_parallel.schedules",
        "megatron.core.optimizer.clip_grads",
        "megatron.core.optimizer.optimizer",
        "megatron.core.optimizer.grad_scaler",
        "megatron.core.distributed.param_and_grad_buffer",
        "megatron.core.tensor_parallel.data",
        "megatron.core.transformer.utils",
        "megatron.core.transformer.moe.moe_utils",
        "megatron.core.rerun_state_machine",
        "megatron.core.utils",
        "megatron.core.dist_checkpointing.strategies.state_dict_saver",
        "megatron.core.dist_checkpointing.exchange_utils",
    ):
        importlib.import_module(name).torch = cpu_torch

    # EP all-to-all split sizes must be host lists; megatron converts them only from CUDA tensors.
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    moe_utils.maybe_move_tensor_to_cpu = _maybe_move_tensor_to_cpu
    if hasattr(token_dispatcher, "maybe_move_tensor_to_cpu"):
        token_dispatcher.maybe_move_tensor_to_cpu = _maybe_move_tensor_to_cpu

    # Megatron moves tensors with .cuda(); on CPU they already are where they belong.
    torch.Tensor.cuda = lambda self, *a, **k: self
    # The optimizer asserts grads are 'torch.cuda.FloatTensor'; CPU grads are 'torch.FloatTensor'.
    _patch_tensor_type_name()
    _APPLIED = True
    logger.info("CUDA not available: megatron-core CPU shims applied (gloo backend)")


def _patch_tensor_type_name() -> None:
    original = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original(self)
            if name.startswith("torch.") and not name.startswith("torch.cuda."):
                return "torch.cuda." + name[len("torch."):]
            return name
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_
