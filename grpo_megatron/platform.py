"""The one place that knows whether we run on CUDA or on CPU, and makes megatron-core run on CPU/gloo.

megatron-core assumes CUDA throughout (``torch.cuda.current_device()`` at ~80 call sites, CUDA streams,
CUDA RNG tracker, ``device="cuda"`` literals). On a machine without CUDA, :func:`apply_cpu_shims`
patches exactly those spots so that its GPTModel, pipeline schedules, DDP and optimizer run on CPU with
gloo. On a CUDA machine it does nothing. Call :func:`setup_platform` once at start-up, before building
models; nothing is patched at import time.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import types
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

_APPLIED = False


@dataclass(frozen=True)
class Platform:
    """What the run has: device kind, the torch.distributed backend, and the optional GPU extras."""

    device_type: str  # "cuda" or "cpu"
    backend: str  # "nccl" or "gloo"
    has_transformer_engine: bool
    has_apex: bool

    @property
    def device(self) -> torch.device:
        if self.device_type == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def has_cuda() -> bool:
    return torch.cuda.is_available()


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except Exception:  # ImportError, or a broken CUDA extension on a CPU machine
        return False


@functools.lru_cache(maxsize=1)
def detect() -> Platform:
    cuda = has_cuda()
    te = cuda and _importable("transformer_engine.pytorch")
    apex = cuda and _importable("apex.optimizers")
    return Platform("cuda" if cuda else "cpu", "nccl" if cuda else "gloo", te, apex)


def setup_platform(local_rank: int = 0, num_threads: int | None = None) -> Platform:
    """Select the device for this process and, without CUDA, install the CPU shims."""
    platform = detect()
    if platform.device_type == "cuda":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        if not platform.has_transformer_engine:
            logger.warning("TransformerEngine not importable: using megatron-core's local layer spec "
                           "(slower; install the 'gpu' extra for TE kernels)")
    else:
        apply_cpu_shims()
    if not platform.has_transformer_engine:
        _patch_for_missing_te()
    if num_threads:
        torch.set_num_threads(num_threads)
    return platform


def device() -> torch.device:
    """Where model inputs and the tensors of the default group's collectives live (NCCL has no CPU backend)."""
    return detect().device


def use_distributed_optimizer(requested: bool | None, data_parallel_size: int) -> bool:
    """Shard fp32 main parameters and Adam state over data-parallel ranks (megatron's distributed optimizer)?

    `requested` None means: on GPUs whenever DP > 1 (replicating ~16 bytes per parameter on every rank is what
    runs a 30B model out of memory); off on CPU, where memory is not the limit and gloo's reduce-scatter is a
    slow emulation. An explicit True/False wins everywhere.
    """
    if requested is not None:
        return requested
    return detect().device_type == "cuda" and data_parallel_size > 1


def empty_cache() -> None:
    if has_cuda():
        torch.cuda.empty_cache()


def synchronize() -> None:
    """Wait for queued GPU work (kernels run asynchronously: host timings need it); no-op on CPU."""
    if has_cuda():
        torch.cuda.synchronize()


def peak_memory_bytes() -> int:
    """Peak device memory on GPU; peak RSS of the process on CPU."""
    if has_cuda():
        return torch.cuda.max_memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _patch_for_missing_te() -> None:
    """Make megatron-core's local (non-TransformerEngine) layer spec usable."""
    import copy

    from megatron.core.transformer import torch_norm
    from megatron.core.transformer.moe import moe_utils

    # megatron-core 0.16 leaves `te_general_gemm` undefined (not None) without TE, so the MoE router's
    # fp32 gating raises NameError; None selects its torch fallback.
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    _patch_unfused_rope()
    _patch_distributed_optimizer_load()

    # torch's norms refuse sequence_parallel (required for MoE with TP > 1). A norm computes the same
    # thing either way; like TE's norms, tag the weights `sequence_parallel` so that DDP all-reduces
    # their gradients over the TP group.
    if getattr(torch_norm.WrappedTorchNorm, "_grpo_patched", False):
        return
    original_new = torch_norm.WrappedTorchNorm.__new__

    def new(cls, config, hidden_size, *args, **kwargs):
        if not config.sequence_parallel:
            return original_new(cls, config, hidden_size, *args, **kwargs)
        plain = copy.copy(config)
        plain.sequence_parallel = False
        norm = original_new(cls, plain, hidden_size, *args, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    torch_norm.WrappedTorchNorm.__new__ = staticmethod(new)
    torch_norm.WrappedTorchNorm._grpo_patched = True


def _patch_distributed_optimizer_load() -> None:
    """Let megatron's distributed optimizer load a checkpoint, exactly, when it runs torch's Adam (no Apex/TE).

    megatron-core 0.16.1 copies every per-parameter entry of the optimizer state from the checkpoint
    (`_set_main_param_and_optimizer_states`, distrib_optimizer.py ~936), including torch Adam's `step`, which
    the fully reshardable format keeps in the common state instead: KeyError. Entries the checkpoint lacks
    keep their current value (the step, already set from the common state). The dp_reshardable format hands
    over the step of the optimizer being loaded (a non-persistent entry, 0 in a fresh one), which would
    overwrite the checkpoint's: skipped, as megatron's own model-space loader does.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if getattr(DistributedOptimizer, "_grpo_patched_load", False):
        return
    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        current = self._get_main_param_and_optimizer_states(model_param)
        loaded = {k: v for k, v in tensors.items() if k != "step"}
        return original(self, model_param, {**{k: v for k, v in current.items() if k not in loaded}, **loaded})

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states

    # Its load_state_dict then gives every parameter's torch-Adam state the *same* `step` tensor
    # (distrib_optimizer.py ~823, `s["step"] = step` in a loop), and torch's Adam increments each state's
    # step in place: after a resume one optimizer step advanced it once per parameter, so the bias
    # correction was wrong from the first resumed step on. One tensor per parameter, as before the save.
    original_load = DistributedOptimizer.load_state_dict

    def load_state_dict(self, state_dict):
        original_load(self, state_dict)
        for state in self.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()

    DistributedOptimizer.load_state_dict = load_state_dict
    DistributedOptimizer._grpo_patched_load = True


def _patch_unfused_rope() -> None:
    """Skip the copy at the end of megatron's unfused RoPE when it rotates the whole head.

    Without TE's fused RoPE, megatron ends every q/k rotation with `torch.cat((rotated, t[..., rot_dim:]))`,
    which copies q and k once more (and again in the backward) even when the pass-through part is empty.
    Same values; partial rotary and MLA keep megatron's function.
    """
    from megatron.core.models.common.embeddings import rope_utils

    original = rope_utils._apply_rotary_pos_emb_bshd
    if getattr(original, "_grpo_patched", False):
        return

    def apply(t, freqs, rotary_interleaved=False, multi_latent_attention=False, mscale=1.0):
        if multi_latent_attention or t.shape[-1] != freqs.shape[-1]:
            return original(t, freqs, rotary_interleaved, multi_latent_attention, mscale)
        cos_ = (torch.cos(freqs) * mscale).to(t.dtype)
        sin_ = (torch.sin(freqs) * mscale).to(t.dtype)
        return (t * cos_) + (rope_utils._rotate_half(t, rotary_interleaved) * sin_)

    apply._grpo_patched, apply.__wrapped__ = True, original
    rope_utils._apply_rotary_pos_emb_bshd = apply


# --------------------------------------------------------------------------------------- CPU shims


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
