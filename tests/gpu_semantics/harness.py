"""CUDA's rules on a CPU-only machine: fake CUDA tensors, fake NCCL-like process groups, no CPU shims.

`fake_gpu_rank(rank, world_size)` makes this process pretend to be rank `rank` of `world_size` GPUs:

* `torch.cuda` answers as a one-GPU machine would (device queries, streams, events, RNG, memory);
* tensors are `FakeTensor`s (shapes, dtypes, devices; no data): a CPU tensor meeting a CUDA tensor
  raises `FakeTensorDeviceMismatchError`, as on a GPU;
* the default process group is `cuda:fake`: a CPU tensor in its collectives raises "No backend type
  associated with device type cpu", as NCCL does; groups asked for with backend="gloo" become `fake`
  (CPU-capable, like gloo on a GPU box). Collectives move no data.

Values are placeholders: `.item()` of a fake tensor answers 1 (False for bools), so control flow continues
on made-up numbers. The mode checks placement and backends; the CPU tests check values. It must run in
a process that never applied `platform.apply_cpu_shims` (they map CUDA to the CPU and would hide
every mismatch), hence `run_scenarios` below, which the tests start in a fresh interpreter.
"""
from __future__ import annotations

import contextlib
import io
import pickle

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

CUDA0 = torch.device("cuda", 0)
SYNCS = {"count": 0}  # torch.cuda.synchronize calls, for PhaseTimer's test


class _Stream:
    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _synchronize(*args, **kwargs) -> None:
    SYNCS["count"] += 1


def _fake_cuda_queries() -> None:
    """torch.cuda as a one-GPU machine answers it (current_device stays an int: megatron indexes with it)."""
    cuda = torch.cuda
    cuda.is_available = lambda: True
    cuda.device_count = lambda: 1
    cuda.current_device = lambda: 0
    cuda.set_device = lambda device: None
    cuda.Stream = cuda.Event = _Stream
    cuda.current_stream = cuda.default_stream = lambda *a, **k: _Stream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.synchronize = _synchronize
    cuda.empty_cache = lambda: None
    cuda.nvtx.range_push = cuda.nvtx.range_pop = lambda *a, **k: None
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        setattr(cuda, name, lambda *a, **k: 0)
    cuda.reset_peak_memory_stats = lambda *a, **k: None
    cuda.mem_get_info = lambda *a, **k: (80 << 30, 80 << 30)
    cuda.get_device_capability = lambda *a, **k: (9, 0)
    cuda.get_device_name = lambda *a, **k: "fake H100"
    cuda.is_bf16_supported = lambda *a, **k: True
    cuda.default_generators = (torch.Generator(),)
    cuda.manual_seed = cuda.manual_seed_all = lambda seed: None
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = cuda.random.set_rng_state = lambda *a, **k: None
    cuda.random.get_rng_state = cuda.get_rng_state


def _rng_tracker_no_ops() -> None:
    """megatron's CUDA RNG tracker compares states with .item() in fork(): states and fork become no-ops."""
    from megatron.core.tensor_parallel import random as mp_random

    mp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda *a, **k: None
    mp_random.CudaRNGStatesTracker.fork = lambda self, *a, **k: contextlib.nullcontext()
    mp_random.CudaRNGStatesTracker.add = lambda self, name, seed: self.states_.__setitem__(name, None)


def _gloo_groups_become_fake() -> None:
    """megatron's gloo groups fail on FakeStore; make them `fake` (CPU-capable) groups."""
    original = dist.new_group
    if getattr(original, "_harness", False):
        return

    def new_group(*args, **kwargs):
        if kwargs.get("backend") == "gloo":
            kwargs["backend"] = "fake"
        return original(*args, **kwargs)

    new_group._harness = True
    dist.new_group = new_group
    dist.distributed_c10d.new_group = new_group


def _cuda_device(device):
    if isinstance(device, int) or device == "cuda" or (isinstance(device, torch.device) and device.type == "cuda"
                                                       and device.index is None):
        return CUDA0
    return device


_SCALARS = {"__int__": int, "__float__": float, "__bool__": bool, "__index__": int, "item": lambda v: v}
_OPERATORS = {"__invert__": "bitwise_not", "__and__": "bitwise_and", "__or__": "bitwise_or",
              "__xor__": "bitwise_xor", "__neg__": "neg"}


class IntDeviceMode(TorchFunctionMode):
    """`device=<int>` and an index-less "cuda" mean cuda:0 (this CPU build reads an int as 'the accelerator'
    and cannot resolve "cuda" without an index); `Tensor.cuda()` is `.to(cuda:0)`."""

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _cuda_device(kwargs["device"])
            if func in (torch.tensor, torch.as_tensor) and kwargs["device"] == CUDA0:
                # torch.tensor builds from Python data outside the fake mode: build on CPU, then move.
                return func(*args, **{k: v for k, v in kwargs.items() if k != "device"}).to(CUDA0)
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and args[0].device.type == "cuda":
            return _getitem(*args) if func is torch.Tensor.__getitem__ else _setitem(*args)
        if func is torch.Tensor.cuda:
            return args[0].to(CUDA0, **{k: v for k, v in kwargs.items() if k == "non_blocking"})
        if func is torch.Tensor.to and len(args) > 1 and not isinstance(args[1], (torch.dtype, torch.Tensor)):
            args = (args[0], _cuda_device(args[1]), *args[2:])
        try:
            return func(*args, **kwargs)
        except RuntimeError as e:
            # Some Python bindings of tensor methods (copy_, contiguous, ...) take a CUDA device guard, which a
            # CPU build cannot make even for fake tensors; the aten op of the same name takes none.
            name = getattr(func, "__name__", "")
            if name in _SCALARS and "not linked with support for cuda" in str(e):
                return _SCALARS[name](torch.ops.aten._local_scalar_dense.default(args[0]))
            op = getattr(torch.ops.aten, _OPERATORS.get(name, name), None)
            if "not linked with support for cuda" not in str(e) or op is None:
                raise
            return op(*args, **kwargs)


def _split_index(x: torch.Tensor, index) -> tuple[torch.Tensor, list | None]:
    """Basic indexing (ints, slices, None, ...) as views; advanced (tensor) indices as aten.index's list.

    Python indexing of a CUDA tensor takes a CUDA device guard in C++, which a CPU build cannot make
    even for fake tensors; the same indexing through aten ops needs none."""
    index = index if isinstance(index, tuple) else (index,)
    used = sum(i.dim() if isinstance(i, torch.Tensor) and i.dtype == torch.bool else 1
               for i in index if i is not None and i is not Ellipsis)
    out, dim, advanced = x, 0, {}
    for i in index:
        if i is None:
            out, dim = out.unsqueeze(dim), dim + 1
        elif i is Ellipsis:
            dim += x.dim() - used
        elif isinstance(i, int):
            out = out.select(dim, i)
        elif isinstance(i, slice):
            out = torch.ops.aten.slice.Tensor(out, dim, i.start, i.stop, i.step or 1)
            dim += 1
        else:
            i = i if isinstance(i, torch.Tensor) else torch.tensor(i).to(x.device)
            advanced[dim] = i
            dim += i.dim() if i.dtype == torch.bool else 1
    if not advanced:
        return out, None
    return out, [advanced.get(d) for d in range(max(advanced) + 1)]


def _getitem(x, index):
    out, advanced = _split_index(x, index)
    return out if advanced is None else torch.ops.aten.index.Tensor(out, advanced)


def _setitem(x, index, value):
    out, advanced = _split_index(x, index)
    if not isinstance(value, torch.Tensor):
        value = torch.full((), value, dtype=x.dtype, device=x.device)
    if advanced is None:
        torch.ops.aten.copy_.default(out, value)
    else:
        torch.ops.aten.index_put_.default(out, advanced, value)


def _placeholder_scalars() -> None:
    """`.item()` of a fake tensor answers 1 (a normaliser must be > 0) (a value fake mode cannot know; see the module docstring)."""
    from torch._subclasses import fake_impls

    def placeholder(fake_mode, func, arg):
        return False if arg.dtype == torch.bool else (1.0 if arg.is_floating_point() else 1)

    for op in (torch.ops.aten.item.default, torch.ops.aten._local_scalar_dense.default):
        fake_impls.op_implementations_dict[op] = placeholder


def _apply_recreates(self, fn, recurse=True):
    """`Module._apply` (`.to(cuda)`, `.bfloat16()`) for fake parameters, which cannot be swapped in place:
    re-create each parameter from `fn(param)`, keeping megatron's attributes (tensor_model_parallel, ...)."""
    if recurse:
        for child in self.children():
            _apply_recreates(child, fn)
    with torch.no_grad():
        for name, param in list(self._parameters.items()):
            if param is None:
                continue
            applied = fn(param)
            if applied is not param:
                new = torch.nn.Parameter(applied, requires_grad=param.requires_grad)
                # megatron's tags only: the fake tensor's own fields (fake_device, ...) stay the new ones
                new.__dict__.update({k: v for k, v in param.__dict__.items() if k not in new.__dict__})
                self._parameters[name] = new
        for name, buf in list(self._buffers.items()):
            if buf is not None:
                self._buffers[name] = fn(buf)
    return self


def _cuda_tensors_in(obj) -> list[str]:
    """Where `obj` holds CUDA tensors (pickled CUDA tensors unpickle onto the sender's GPU index)."""
    found = []

    class Probe(pickle.Pickler):
        def persistent_id(self, value):
            if isinstance(value, torch.Tensor) and value.device.type == "cuda":
                found.append(f"{tuple(value.shape)} {value.dtype} on {value.device}")
                return "cuda-tensor"
            return None

    Probe(io.BytesIO()).dump(obj)
    return found


def _checked_object(obj, name: str):
    cuda = _cuda_tensors_in(obj)
    if cuda:
        raise RuntimeError(f"{name} of CUDA tensors ({', '.join(cuda[:3])}): receivers unpickle them onto the "
                           f"sender's device index; send CPU tensors or use tensor collectives")
    return obj


def _object_collectives_echo() -> None:
    """Object collectives pickle, which needs values: check the payload (no CUDA tensors), then every rank's
    object is this rank's own (a fake group moves no data anyway)."""
    def all_gather_object(object_list, obj, group=None):
        _checked_object(obj, "all_gather_object")
        object_list[:] = [obj] * len(object_list)

    def broadcast_object_list(object_list, src=None, group=None, device=None, group_src=None):
        for obj in object_list:
            _checked_object(obj, "broadcast_object_list")

    dist.all_gather_object = all_gather_object
    dist.broadcast_object_list = broadcast_object_list


_INSTALLED = False


def install() -> None:
    """The process-wide patches (idempotent). Call before anything builds a model."""
    global _INSTALLED
    if _INSTALLED:
        return
    from grpo_megatron import platform

    assert not platform.cpu_shims_applied(), "the CPU shims are applied in this process: they would hide CUDA's rules"
    _fake_cuda_queries()
    _rng_tracker_no_ops()
    _gloo_groups_become_fake()
    _placeholder_scalars()
    _object_collectives_echo()
    torch.nn.Module._apply = _apply_recreates
    platform.detect.cache_clear()
    _INSTALLED = True


@contextlib.contextmanager
def fake_gpu_rank(rank: int, world_size: int):
    """Run the body as rank `rank` of `world_size` GPUs under CUDA's rules (see the module docstring)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from grpo_megatron import parallel

    install()
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("cuda:fake", store=FakeStore(), rank=rank, world_size=world_size)
    parallel.init_control_group(timeout_minutes=1.0)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), IntDeviceMode():
            yield
    finally:
        parallel.destroy()
