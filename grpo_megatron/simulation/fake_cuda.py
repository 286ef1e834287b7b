"""Fake CUDA: `torch.cuda` answering as a one-GPU machine, CUDA tensors as FakeTensors, and what Python-level
torch needs to handle them in a CPU build (see the package docstring for the whole picture).

Values are placeholders: `.item()` of a fake tensor answers 1 (False for bools), so control flow continues on
made-up numbers; shapes, dtypes, devices and process groups are real.
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
    """A CUDA stream or event: work is already ordered, events are complete (`record_event` gives one: megatron's
    MoE dispatcher synchronizes on it)."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def record_event(self, *args, **kwargs):
        return _Stream()

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _synchronize(*args, **kwargs) -> None:
    SYNCS["count"] += 1


def fake_cuda_queries() -> None:
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


def rng_tracker_no_ops() -> None:
    """megatron's CUDA RNG tracker compares states with .item() in fork(): states and fork become no-ops."""
    from megatron.core.tensor_parallel import random as mp_random

    mp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda *a, **k: None
    mp_random.CudaRNGStatesTracker.fork = lambda self, *a, **k: contextlib.nullcontext()
    mp_random.CudaRNGStatesTracker.add = lambda self, name, seed: self.states_.__setitem__(name, None)


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


_BOOL_PLACEHOLDER = [False]


@contextlib.contextmanager
def placeholder_bools(value: bool):
    """In the body, a fake bool's `.item()` answers `value` (for a check that has verified, on real local
    values, what a reduced flag would say)."""
    _BOOL_PLACEHOLDER.append(value)
    try:
        yield
    finally:
        _BOOL_PLACEHOLDER.pop()


def placeholder_scalars() -> None:
    """`.item()` of a fake tensor answers 1 (a normaliser must be > 0), False for bools (a value fake mode cannot
    know; see the module docstring)."""
    from torch._subclasses import fake_impls

    def placeholder(fake_mode, func, arg):
        return _BOOL_PLACEHOLDER[-1] if arg.dtype == torch.bool else (1.0 if arg.is_floating_point() else 1)

    for op in (torch.ops.aten.item.default, torch.ops.aten._local_scalar_dense.default):
        fake_impls.op_implementations_dict[op] = placeholder


def apply_recreates(self, fn, recurse=True):
    """`Module._apply` (`.to(cuda)`, `.bfloat16()`) for fake parameters, which cannot be swapped in place:
    re-create each parameter from `fn(param)`, keeping megatron's attributes (tensor_model_parallel, ...)."""
    if recurse:
        for child in self.children():
            apply_recreates(child, fn)
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
            if isinstance(value, torch.Tensor):  # fake tensors do not pickle: each is a leaf here
                if value.device.type == "cuda":
                    found.append(f"{tuple(value.shape)} {value.dtype} on {value.device}")
                return "tensor"
            return None

    Probe(io.BytesIO()).dump(obj)
    return found


def _checked_object(obj, name: str):
    cuda = _cuda_tensors_in(obj)
    if cuda:
        raise RuntimeError(f"{name} of CUDA tensors ({', '.join(cuda[:3])}): receivers unpickle them onto the "
                           f"sender's device index; send CPU tensors or use tensor collectives")
    return obj


def object_collectives_echo() -> None:
    """Object collectives pickle, which needs values: check the payload (no CUDA tensors), then every rank's
    object is this rank's own (a fake group moves no data anyway)."""
    def all_gather_object(object_list, obj, group=None):
        _checked_object(obj, "all_gather_object")
        object_list[:] = [_PEERS[-1](r, obj) if _PEERS else obj for r in range(len(object_list))]

    def broadcast_object_list(object_list, src=None, group=None, device=None, group_src=None):
        for obj in object_list:
            _checked_object(obj, "broadcast_object_list")

    def send_object_list(object_list, dst=None, group=None, device=None, group_dst=None):
        for obj in object_list:
            _checked_object(obj, "send_object_list")

    def recv_object_list(object_list, src=None, group=None, device=None, group_src=None):
        return src  # nothing arrives: the list keeps what the caller put in it

    dist.all_gather_object = all_gather_object
    dist.broadcast_object_list = broadcast_object_list
    dist.send_object_list = send_object_list
    dist.recv_object_list = recv_object_list


_PEERS: list = []


@contextlib.contextmanager
def peer_objects(answer):
    """In the body, `all_gather_object` gives rank r's entry as `answer(r, own_object)` (for a check that knows
    what each rank sends, e.g. its pipeline stage from megatron's layout) instead of this rank's own object."""
    _PEERS.append(answer)
    try:
        yield
    finally:
        _PEERS.pop()


def storage_data_pointers() -> None:
    """A fake CUDA storage's `data_ptr()` is 0 for every storage; code that tells storages apart by address (an
    offload that parks each distinct storage once) would see one. Give each its StorageImpl's address instead:
    unique while it lives, and 0 once resized to nothing, as a GPU allocation's address."""
    original = torch.UntypedStorage.data_ptr
    if getattr(original, "_fake_cuda", False):
        return

    def data_ptr(self):
        if self.device.type == "meta":  # a fake tensor's storage (it holds no data, so no address)
            return self._cdata if self.nbytes() > 0 else 0
        return original(self)

    data_ptr._fake_cuda = True
    torch.UntypedStorage.data_ptr = data_ptr
