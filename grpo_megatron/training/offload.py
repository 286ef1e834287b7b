"""The trainer's device memory given back while colocated GPU servers generate, and taken again for the update.

With SGLang servers on the trainer's GPUs, the trainer's fp32 gradient buffers, fp32 master parameters and Adam
moments (~14 bytes per parameter) and SGLang's weights and KV cache do not fit on one 80 GB card at once. As slime
and verl do, the trainer releases them before generation and brings them back before its update:
- gradient buffers: freed with megatron-core's own `DistributedDataParallel.offload_grad_buffers` (storage resized
  to 0, every `main_grad` and bucket view kept) and reallocated zeroed by `restore_grad_buffers`; their content is
  dead between steps (each step zeroes them first), so nothing is copied;
- optimizer state (Adam moments, step counts) and fp32 master parameters: copied to host memory (pinned on GPU),
  their device storage resized to 0, and copied back into the same storage, so every view and every reference the
  optimizer holds stays valid and the values are bit-identical;
- model parameters, with `offload_params`, likewise (needed for the weight push, so only around generation).
megatron's own `offload_to_cpu` moves optimizer tensors only where `is_cuda` and leaves grad buffers and params.
"""
from __future__ import annotations

import torch


def device_memory_report() -> dict[str, float]:
    """Allocated and reserved device memory in GiB (torch.cuda's caching allocator); {} without CUDA."""
    if not torch.cuda.is_available():
        return {}
    gib = float(1 << 30)
    return {"allocated_gib": torch.cuda.memory_allocated() / gib, "reserved_gib": torch.cuda.memory_reserved() / gib,
            "max_allocated_gib": torch.cuda.max_memory_allocated() / gib}


class _HostCopies:
    """Device storages parked in host memory: (storage, its host copy, its size in bytes)."""

    def __init__(self):
        self.parked: list[tuple[torch.UntypedStorage, torch.UntypedStorage, int]] = []

    def park(self, storages: list[torch.UntypedStorage]) -> None:
        pin = torch.cuda.is_available()
        for storage in storages:
            size = storage.nbytes()
            host = torch.empty(size, dtype=torch.uint8, pin_memory=pin and storage.device.type == "cuda")
            host = host.untyped_storage()
            host.copy_(storage, non_blocking=True)
            self.parked.append((storage, host, size))
        if self.parked and torch.cuda.is_available():
            torch.cuda.synchronize()  # the copies are done before the device memory is reused
        for storage, _, _ in self.parked:
            storage.resize_(0)

    def restore(self) -> None:
        for storage, host, size in self.parked:
            storage.resize_(size)
            storage.copy_(host, non_blocking=True)
        if self.parked and torch.cuda.is_available():
            torch.cuda.synchronize()
        self.parked = []


def _unique_live(tensors, exclude: set[int] = frozenset()) -> list[torch.UntypedStorage]:
    """The distinct non-empty storages behind `tensors`, leaving out those whose data pointer is in `exclude`."""
    found: dict[int, torch.UntypedStorage] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if storage.nbytes() > 0 and pointer not in exclude:
            found.setdefault(pointer, storage)
    return list(found.values())


def _optimizer_tensors(optimizer):
    """Every tensor of the inner torch optimizers: their parameters (megatron's fp32 masters) and their state."""
    for wrapper in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(wrapper, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            yield from (p for p in group["params"] if isinstance(p, torch.Tensor))
        for state in inner.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))


class TrainStateOffload:
    """Offload/onload of one policy's training state; each call is a no-op for what is already where it asks."""

    def __init__(self, model_chunks: list, optimizer, *, offload_params: bool = False):
        self.model_chunks = list(model_chunks)
        self.optimizer = optimizer
        self.offload_params = offload_params
        self._grads_off = False
        self._optimizer_state = _HostCopies()
        self._params = _HostCopies()

    def _param_storages(self) -> list[torch.UntypedStorage]:
        return _unique_live(p for chunk in self.model_chunks for p in chunk.parameters())

    def offload_optimizer_and_grads(self) -> None:
        """Gradient buffers and optimizer state off the device; parameters stay (the weight push reads them).
        fp32 runs have no master copies: their optimizer's parameters are the model's and stay too."""
        if not self._grads_off:
            for chunk in self.model_chunks:
                chunk.offload_grad_buffers(synchronize=False, empty_cache=False)
            self._grads_off = True
        if not self._optimizer_state.parked and self.optimizer is not None:
            model = {s.data_ptr() for s in self._param_storages()}
            self._optimizer_state.park(_unique_live(_optimizer_tensors(self.optimizer), exclude=model))
        _empty_cache()

    def offload(self) -> None:
        """Everything this offload manages off the device: grad buffers, optimizer state and, with
        `offload_params`, the model parameters."""
        self.offload_optimizer_and_grads()
        if self.offload_params and not self._params.parked:
            self._params.park(self._param_storages())
            _empty_cache()

    def onload(self) -> None:
        """Everything back: parameters and optimizer state bit-identical, grad buffers zeroed."""
        self._params.restore()
        self._optimizer_state.restore()
        if self._grads_off:
            for chunk in self.model_chunks:
                chunk.restore_grad_buffers(synchronize=False)
            self._grads_off = False


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the caching allocator's freed blocks back to the device, for the servers


class GenerationMemory:
    """The trainer's side of a step's memory hand-over, and `memory/<boundary>/<allocated|reserved>_gib` metrics at
    every boundary (on CUDA). Active (offloading) only with colocated GPU servers, where the memory is shared."""

    def __init__(self, model_chunks: list, optimizer, *, active: bool, offload_params: bool = False):
        self.offload = TrainStateOffload(model_chunks, optimizer, offload_params=offload_params) if active else None
        self.metrics: dict[str, float] = {}

    def _record(self, boundary: str) -> None:
        for key, value in device_memory_report().items():
            self.metrics[f"memory/{boundary}/{key}"] = value

    def before_generation(self) -> None:
        if self.offload is not None:
            self.offload.offload()
        self._record("generation_start")

    def after_generation(self) -> None:
        self._record("generation_end")
        self.onload()
        self._record("train_start")

    def before_weight_sync(self) -> None:
        self._record("train_end")
        if self.offload is not None:
            self.offload.offload_optimizer_and_grads()
        self._record("weight_sync_start")

    def onload(self) -> None:
        """Everything back on the device (also before a checkpoint reads the optimizer state)."""
        if self.offload is not None:
            self.offload.onload()

    def take_metrics(self) -> dict[str, float]:
        metrics, self.metrics = self.metrics, {}
        return metrics
