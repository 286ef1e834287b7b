"""Device bytes of a simulated rank: every live fake CUDA storage counted once, as the CUDA caching allocator's
`memory_allocated()` would count it (exact tensor bytes; no fragmentation, context or NCCL buffers).

The counter is a TorchDispatchMode entered inside the FakeTensorMode: it sees each op's outputs, records each new
CUDA storage once (views and in-place results share their input's storage) and subtracts it when Python frees
it (`weakref.finalize` on the storage object, which lives exactly as long as a tensor viewing it). Bytes are
attributed to the category in force when the storage was allocated (`with counter.category("grads"): ...`).
"""
from __future__ import annotations

import contextlib
import gc
import weakref
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@dataclass
class Snapshot:
    """Live bytes at one moment: in total and by allocation category."""

    total: int
    by_category: dict[str, int]


class DeviceMemoryCounter(TorchDispatchMode):
    """Live and peak bytes of fake CUDA storages, by category (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self.live: dict[int, tuple[int, str, weakref.ref]] = {}  # storage id -> (bytes, category, storage)
        self.by_category: dict[str, int] = defaultdict(int)
        self._category = "other"

    @contextlib.contextmanager
    def category(self, name: str):
        """Attribute the storages allocated in the body to `name`."""
        previous, self._category = self._category, name
        try:
            yield
        finally:
            self._category = previous

    def reset_peak(self) -> None:
        """Start a new peak at the current level (as torch.cuda.reset_peak_memory_stats)."""
        gc.collect()
        self.peak = self.current

    def snapshot(self) -> Snapshot:
        """Live bytes after a garbage collection (reference cycles hold activations until one runs)."""
        gc.collect()
        return Snapshot(self.current, {k: v for k, v in self.by_category.items() if v})

    def track(self, tensor: torch.Tensor) -> None:
        """Count `tensor`'s storage if it is on CUDA and not counted yet (also for tensors made before the
        counter started, which it then sees as inputs)."""
        if tensor.device.type != "cuda":
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.live:
            return
        nbytes = storage.nbytes()
        self.live[key] = (nbytes, self._category, weakref.ref(storage))
        self.current += nbytes
        self.by_category[self._category] += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def device_bytes(self) -> int:
        """Live bytes as the storages hold them now: also right after storages were resized in place (megatron's
        `offload_grad_buffers`, an offload's `storage.resize_(0)`), which the running count does not see."""
        gc.collect()
        return sum(storage.nbytes() for _, _, ref in self.live.values() if (storage := ref()) is not None)

    def _free(self, key: int) -> None:
        nbytes, category, _ = self.live.pop(key, (0, "other", None))
        self.current -= nbytes
        self.by_category[category] -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self.track(value)
        return out
