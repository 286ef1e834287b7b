"""The policy as a stream of HF-named weight buckets, assembled where the weights live, in bounded memory.

Each pipeline stage converts only its own layers: a TP-sharded parameter is all-gathered inside its TP group,
a local expert inside its EP (then ETP) group, and the full HF tensors are packed into flat byte buckets of at
most `bucket_bytes` (SGLang's flattened-bucket layout: tensors back to back, each at a multiple of its element
size). Stages take turns; each bucket travels from its stage's first rank to the ranks that send it on (rank 0,
or every rank for colocated CUDA-IPC sends), one bucket at a time. A rank therefore holds its own shards, the
bucket being filled, the one still being sent, and one gathered tensor, never the model.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from grpo_megatron.models.provider import PolicyModel
from grpo_megatron.models.weight_keys import ParamKey, chunk_tensors, is_ep_expert
from grpo_megatron.ranks import multi_rank

Alloc = Callable[[int, torch.device], torch.Tensor]
"""Makes the flat uint8 buffer of a bucket (nbytes, device): plain memory, or shared memory for tensor mode."""


def plain_alloc(nbytes: int, device: torch.device) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, device=device)


@dataclass
class Bucket:
    """Named tensors stored back to back in one uint8 buffer; `last` marks the model's final bucket."""

    names: list[str]
    dtypes: list[torch.dtype]
    shapes: list[tuple[int, ...]]
    flat: torch.Tensor
    last: bool = False

    @property
    def offsets(self) -> list[int]:
        out, offset = [], 0
        for dtype, shape in zip(self.dtypes, self.shapes):
            out.append(offset)
            offset += _nbytes(dtype, shape)
        return out

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(d, s) for d, s in zip(self.dtypes, self.shapes))

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        """The bucket's tensors as views of its buffer (no copy)."""
        return [(name, self.flat[offset:offset + _nbytes(dtype, shape)].view(dtype).view(shape))
                for name, dtype, shape, offset in zip(self.names, self.dtypes, self.shapes, self.offsets)]

    def meta(self) -> tuple:
        return self.names, self.dtypes, self.shapes, self.last


def _nbytes(dtype: torch.dtype, shape) -> int:
    return dtype.itemsize * int(torch.Size(shape).numel())


class BucketPacker:
    """Copies named tensors into buckets as they arrive; a tensor that would overflow one starts the next.

    A tensor larger than `bucket_bytes` travels alone in a buffer of its own size. A tensor whose offset would
    not be a multiple of its element size also starts a new bucket (SGLang's layout has no padding).
    `dry` packers track only names and sizes: ranks that take part in the gathers but do not send.
    `total_bytes`, what all tensors will add up to, sizes the last buffer to what is left instead of a whole
    bucket (a shared-memory buffer costs its full size to create); a wrong hint only cuts buckets differently.
    """

    def __init__(self, bucket_bytes: int, alloc: Alloc = plain_alloc, dry: bool = False,
                 total_bytes: int | None = None):
        if bucket_bytes < 1:
            raise ValueError(f"bucket size {bucket_bytes} bytes: must be >= 1 (rollout.sglang.bucket_mb > 0)")
        self.bucket_bytes, self.alloc, self.dry = bucket_bytes, alloc, dry
        self.remaining = total_bytes
        self._reset()

    def _reset(self) -> None:
        self.names, self.dtypes, self.shapes = [], [], []
        self.used = 0
        self.capacity = 0
        self.buffer: torch.Tensor | None = None

    def fits(self, tensor: torch.Tensor) -> bool:
        """Whether `tensor` can join the current bucket (an empty bucket takes anything)."""
        nbytes = tensor.numel() * tensor.element_size()
        return not self.names or (self.used + nbytes <= self.capacity and not self.used % tensor.element_size())

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Pack one tensor into the current bucket; call `finish` first when it does not fit."""
        nbytes = tensor.numel() * tensor.element_size()
        if not self.names:
            left = self.remaining if self.remaining is not None and self.remaining > 0 else self.bucket_bytes
            self.capacity = max(nbytes, min(self.bucket_bytes, left))
            if not self.dry:
                self.buffer = self.alloc(self.capacity, tensor.device)
        if not self.dry:
            self.buffer[self.used:self.used + nbytes].view(tensor.dtype).view(tensor.shape).copy_(tensor)
        if self.remaining is not None:
            self.remaining -= nbytes
        self.names.append(name)
        self.dtypes.append(tensor.dtype)
        self.shapes.append(tuple(tensor.shape))
        self.used += nbytes

    def finish(self, last: bool) -> Bucket | None:
        """The bucket packed so far (None when empty), and start a new one."""
        if not self.names:
            return None
        flat = self.buffer[:self.used] if self.buffer is not None else torch.empty(0, dtype=torch.uint8)
        bucket = Bucket(self.names, self.dtypes, self.shapes, flat, last)
        self._reset()
        return bucket


def pack(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int, alloc: Alloc = plain_alloc,
         last: bool = True, dry: bool = False, total_bytes: int | None = None) -> Iterator[Bucket]:
    """Buckets of `named_tensors` in order; the final one has `last` set when `last` is true.

    A full bucket is handed over before the next buffer is allocated, so with the consumer's one bucket in
    flight at most two exist (plus the tensor waiting to be packed).
    """
    if isinstance(named_tensors, (list, tuple)) and total_bytes is None:
        total_bytes = sum(t.numel() * t.element_size() for _, t in named_tensors)
    packer = BucketPacker(bucket_bytes, alloc, dry, total_bytes)
    for name, tensor in named_tensors:
        if not packer.fits(tensor):
            yield packer.finish(last=False)
        packer.add(name, tensor)
    final = packer.finish(last)
    if final is not None:
        yield final


Selection = frozenset[ParamKey] | None
"""The parameters to stream (grpo_megatron.models.weight_changes), the same on every rank of a stage; None: all."""


@torch.no_grad()
def stage_hf_tensors(model: PolicyModel, only: Selection = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) for this pipeline stage's parameters; collectives over TP/EP/ETP groups only.

    The same conversion as mbridge's export_weights (its merge and name-mapping methods) without its
    per-tensor pipeline broadcast and object all-gathers: a stage converts its own layers. With `only`, just the
    HF tensors of the selected parameters (a local expert: of the selected EP ranks' copies).
    """
    bridge = model.bridge
    mpu = bridge.mpu
    if mpu.ep_size == 1 and mpu.etp_size not in (1, mpu.tp_size):
        raise NotImplementedError(
            "export with expert_parallel=1 needs expert_tensor_parallel equal to tensor_parallel or 1")
    for index, chunk in enumerate(model.unwrapped()):
        global_names = bridge._weight_name_mapping_mcore_local_to_global(chunk, consider_ep=False)
        for local, param in chunk_tensors(chunk):
            name = global_names[local]
            if is_ep_expert(name, mpu.ep_size):
                ep_ranks = _selected_ep_ranks(only, index, local, mpu.ep_size)
                if ep_ranks:
                    yield from _expert_tensors(bridge, name, param.detach(), ep_ranks)
                continue
            if only is not None and (index, local, 0) not in only:
                continue
            full = param.detach()
            if getattr(param, "tensor_model_parallel", False) and mpu.tp_size > 1:
                full = bridge._weight_merge_across_tp(name, _all_gather(full, mpu.tp_group, mpu.tp_size), param)
            yield from zip(*bridge._weight_to_hf_format(name, full))


def _selected_ep_ranks(only: Selection, index: int, local: str, ep_size: int) -> list[int]:
    """The EP ranks whose copy of local expert `local` is streamed."""
    return [r for r in range(ep_size) if only is None or (index, local, r) in only]


def stage_hf_bytes(model: PolicyModel, only: Selection = None) -> int:
    """What stage_hf_tensors will yield in bytes, from the local shards' sizes (TP/ETP/EP gathers multiply)."""
    mpu, total = model.bridge.mpu, 0
    for index, chunk in enumerate(model.unwrapped()):
        global_names = model.bridge._weight_name_mapping_mcore_local_to_global(chunk, consider_ep=False)
        for local, param in chunk_tensors(chunk):
            expert = ".mlp.experts." in local
            if is_ep_expert(global_names[local], mpu.ep_size):
                factor = len(_selected_ep_ranks(only, index, local, mpu.ep_size))
            else:
                factor = 1 if only is None or (index, local, 0) in only else 0
            if getattr(param, "tensor_model_parallel", False):
                factor *= mpu.etp_size if expert and mpu.ep_size > 1 else mpu.tp_size
            total += param.numel() * param.element_size() * factor
    return total


def _expert_tensors(bridge, name: str, param: torch.Tensor, ep_ranks: list[int]) -> Iterator[tuple[str, torch.Tensor]]:
    """The EP group's copies of local expert `name` from `ep_ranks`, each merged over ETP, under HF names."""
    mpu = bridge.mpu
    prefix, local_id = name.split(".weight")
    per_rank = bridge.config.num_moe_experts // mpu.ep_size
    for ep_rank, expert in enumerate(_all_gather(param, mpu.ep_group, mpu.ep_size)):
        if ep_rank not in ep_ranks:
            continue
        expert_name = f"{prefix}.weight{per_rank * ep_rank + int(local_id)}"
        shards = _all_gather(expert, mpu.etp_group, mpu.etp_size) if mpu.etp_size > 1 else [expert]
        yield from zip(*bridge._weight_to_hf_format(expert_name, bridge._weight_merge_across_tp(
            expert_name, shards, param)))


def _all_gather(tensor: torch.Tensor, group, size: int) -> list[torch.Tensor]:
    out = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(out, tensor.contiguous(), group=group)
    return out


def hf_buckets(model: PolicyModel, bucket_bytes: int, to_every_rank: bool = False,
               alloc: Alloc = plain_alloc, only: Selection = None) -> Iterator[Bucket]:
    """The whole model (or the `only` selection) as buckets, on rank 0 (or on every rank); other ranks get an
    empty iterator.

    Every rank must exhaust it (the collectives run as it is iterated). Stages go in pipeline order; a stage's
    first rank packs and sends, its other ranks take part in the gathers with a dry packer so that they know
    where buckets end. Bucket metadata travels over the gloo control group, the bytes over the default group.
    """
    if not multi_rank():
        yield from pack(stage_hf_tensors(model, only), bucket_bytes, alloc, total_bytes=stage_hf_bytes(model, only))
        return
    from grpo_megatron.parallel import control_group

    mpu, rank, control = model.bridge.mpu, dist.get_rank(), control_group()
    stages: list = [None] * dist.get_world_size()
    dist.all_gather_object(stages, mpu.pp_rank, group=control)
    leaders = [stages.index(s) for s in range(mpu.pp_size)]
    receives = to_every_rank or rank == 0
    for stage, leader in enumerate(leaders):
        last_stage = stage == mpu.pp_size - 1
        if mpu.pp_rank == stage:
            own = pack(stage_hf_tensors(model, only), bucket_bytes, alloc, last_stage, dry=rank != leader,
                       total_bytes=stage_hf_bytes(model, only))
            for bucket in own:
                bucket = _deliver(bucket, leader, to_every_rank, control, alloc)
                if bucket is not None and receives:
                    yield bucket
            _deliver(None, leader, to_every_rank, control, alloc)
        elif receives:
            while (bucket := _deliver(None, leader, to_every_rank, control, alloc)) is not None:
                yield bucket


def _deliver(bucket: Bucket | None, leader: int, to_every_rank: bool, control, alloc: Alloc) -> Bucket | None:
    """One bucket (or the end of a stage, None) from `leader` to rank 0 or to every rank; what this rank gets.

    The leader passes its packed bucket, a stage rank that is not the leader its dry one (it receives the
    bytes when every rank does), a rank outside the stage None.
    """
    rank = dist.get_rank()
    if not to_every_rank and leader == 0:
        return bucket  # rank 0 packed it itself; nobody else needs it
    if not to_every_rank and rank not in (0, leader):
        return None
    box = [bucket.meta() if bucket is not None and rank == leader else None]
    if to_every_rank:
        dist.broadcast_object_list(box, src=leader, group=control)
    elif rank == leader:
        dist.send_object_list(box, dst=0, group=control)
    else:
        dist.recv_object_list(box, src=leader, group=control)
    if box[0] is None:
        return None
    if rank != leader:
        names, dtypes, shapes, last = box[0]
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        flat = alloc(sum(_nbytes(d, s) for d, s in zip(dtypes, shapes)), device or torch.device("cpu"))
        bucket = Bucket(names, dtypes, shapes, flat, last)
    if to_every_rank:
        dist.broadcast(bucket.flat, src=leader)
    elif rank == leader:
        dist.send(bucket.flat, dst=0)
    else:
        dist.recv(bucket.flat, src=leader)
    return bucket
