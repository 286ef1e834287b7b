"""Which megatron parameters changed since the last weight sync (rollout.sglang.sync_changed_only).

Each rank fingerprints its own parameter shards (64 bits each, on their device) and keeps the fingerprints of the
last sync; one all_gather_object over the gloo control group then gives every rank the changed shards of every
rank of its pipeline stage, so all of them select the same parameters (their gathers and bucket cuts must
agree). The selection is a set of `ParamKey`s that grpo_megatron.models.weight_stream streams instead of the
whole model.

The fingerprint of a shard x (its bits as integers, widened to int64) is sum_c m_c * sum_i w_i * x[c, i] modulo
2**64, over chunks c of 2**20 elements, with fixed odd weights w_i and chunk multipliers m_c. A change of one
element by d (0 < |d| < 2**64 as integers) moves it by m_c * w_i * d, never 0 modulo 2**64 since m_c * w_i is odd:
every single-element change is caught; several at once collide only by a ~2**-64 chance of the random weights.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from grpo_megatron.models.provider import PolicyModel
from grpo_megatron.models.weight_keys import ParamKey, chunk_tensors, is_ep_expert
from grpo_megatron.ranks import multi_rank

_CHUNK = 1 << 20  # elements per partial sum: an 8 MiB int64 temporary
_INT_VIEWS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_WEIGHTS: dict[torch.device, torch.Tensor] = {}
_MASK = (1 << 64) - 1


def _position_weights(device: torch.device) -> torch.Tensor:
    """The fixed odd weights w_i (int64, one per position in a chunk), made once per device."""
    if device not in _WEIGHTS:
        gen = torch.Generator().manual_seed(0x5EED)
        weights = torch.randint(-(1 << 63), (1 << 63) - 1, (_CHUNK,), dtype=torch.int64, generator=gen) | 1
        _WEIGHTS[device] = weights.to(device)
    return _WEIGHTS[device]


def _chunk_multiplier(index: int) -> int:
    """m_c: splitmix64 of the chunk index, made odd, as a signed int64 (what torch multiplies by)."""
    z = (index * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    z = (z ^ (z >> 31)) | 1
    return z - (1 << 64) if z >= 1 << 63 else z


@torch.no_grad()
def fingerprint(tensor: torch.Tensor) -> torch.Tensor:
    """The 64-bit fingerprint of `tensor`'s bits, a 0-dim int64 on its device (no host sync)."""
    flat = tensor.detach().contiguous().reshape(-1).view(_INT_VIEWS[tensor.element_size()])
    weights = _position_weights(flat.device)
    total = torch.zeros((), dtype=torch.int64, device=flat.device)
    for index, start in enumerate(range(0, flat.numel(), _CHUNK)):
        part = flat[start:start + _CHUNK].to(torch.int64)
        total += (part * weights[:part.numel()]).sum() * _chunk_multiplier(index)  # int64 wraps: modulo 2**64
    return total


def local_fingerprints(model: PolicyModel) -> dict[tuple[int, str], int]:
    """(chunk index, local name) -> fingerprint of this rank's shard; frozen parameters (requires_grad False)
    are left out, as they never change. One host sync for all of them."""
    keys, values = [], []
    for index, chunk in enumerate(model.unwrapped()):
        for name, param in chunk_tensors(chunk):
            if isinstance(param, torch.nn.Parameter) and not param.requires_grad:
                continue
            keys.append((index, name))
            values.append(fingerprint(param))
    return dict(zip(keys, torch.stack(values).tolist())) if values else {}


class ChangeTracker:
    """The fingerprints of the last completed sync on this rank, and the selection of the next one.

    Every rank calls `select` before a sync and `commit` after it returned: a sync that failed is not committed,
    so the next one sends everything changed since the last that completed.
    """

    def __init__(self):
        self._synced: dict[tuple[int, str], int] | None = None
        self._pending: dict[tuple[int, str], int] | None = None

    def select(self, model: PolicyModel, full: bool = False) -> frozenset[ParamKey] | None:
        """The parameters to send (None: all of them), identical on every rank of a stage.

        Everything when any rank asks for `full` (rank 0 does when a server may not hold the last push) or has
        no previous sync (the first sync of every process). The last stage always sends its smallest tensor, so
        that the final request, which sets the weight version and flushes the cache, exists.
        """
        mpu = model.bridge.mpu
        self._pending = local_fingerprints(model)
        full = full or self._synced is None
        changed = [] if full else [k for k, v in self._pending.items() if self._synced.get(k) != v]
        entries = [(mpu.pp_rank, mpu.ep_rank, changed, full)]
        if multi_rank():
            from grpo_megatron.parallel import control_group

            entries = [None] * dist.get_world_size()
            dist.all_gather_object(entries, (mpu.pp_rank, mpu.ep_rank, changed, full), group=control_group())
        if any(entry[3] for entry in entries):
            return None
        experts = _ep_experts(model)
        keys = {(index, name, ep_rank if (index, name) in experts else 0)
                for pp_rank, ep_rank, names, _ in entries if pp_rank == mpu.pp_rank for index, name in names}
        if mpu.pp_rank == mpu.pp_size - 1:
            keys.add(_anchor(model))
        return frozenset(keys)

    def commit(self) -> None:
        """The selected sync completed: its fingerprints become the reference of the next."""
        self._synced, self._pending = self._pending, None


def _ep_experts(model: PolicyModel) -> set[tuple[int, str]]:
    """(chunk index, local name) of the local experts the stream gathers over EP (the same on every rank)."""
    bridge = model.bridge
    return {(index, local) for index, chunk in enumerate(model.unwrapped())
            for local, name in bridge._weight_name_mapping_mcore_local_to_global(chunk, consider_ep=False).items()
            if is_ep_expert(name, bridge.mpu.ep_size)}


def _anchor(model: PolicyModel) -> ParamKey:
    """The last chunk's smallest non-expert parameter (a norm's weight): the same on every rank of the stage."""
    index = len(model.chunks) - 1
    params = [(p.numel(), n) for n, p in chunk_tensors(model.unwrapped()[index]) if ".mlp.experts." not in n]
    return index, min(params, key=lambda item: item[0])[1], 0
