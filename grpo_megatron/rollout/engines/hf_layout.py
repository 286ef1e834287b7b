"""Writing HF *checkpoint-named* tensors into an in-memory transformers model.

transformers 5 fuses some checkpoint tensors at load time (e.g. MoE experts.{e}.gate_proj/up_proj ->
experts.gate_up_proj), so the names the trainer exports (the ones save_pretrained writes) are not the
model's parameter names. Rather than hard-coding each family's fusion, we run transformers' own reverse
conversion (the one save_pretrained uses) over tensors of element ids: every checkpoint tensor then tells
us exactly which elements of which parameter it fills. Most land in one contiguous range, so they are
kept as (parameter, offset); only the rest keep an index tensor. Building the map briefly holds one int64
per parameter element, which is fine for the models an in-process engine serves.
"""
from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from transformers.core_model_loading import revert_weight_conversion

_MAX_LISTED = 10


class WeightUpdateError(ValueError):
    """The tensors given to update_weights do not match the model (unknown, missing or mis-shaped)."""


@dataclass(frozen=True)
class _Target:
    param_name: str
    shape: torch.Size
    offset: int  # start of a contiguous range in the flattened parameter, or -1 when `index` is used
    index: torch.Tensor | None


class CheckpointLayout:
    """Where each checkpoint tensor of `model` lives among its parameters."""

    def __init__(self, model: torch.nn.Module):
        self._params = dict(model.named_parameters())  # tied weights appear once, as in the checkpoint
        self._names = list(self._params)
        self._starts, ids, start = [], {}, 0
        for name, param in self._params.items():
            self._starts.append(start)
            ids[name] = torch.arange(start, start + param.numel(), dtype=torch.int64).view(param.shape)
            start += param.numel()
        self._targets = {
            name: self._locate(name, element_ids)
            for name, element_ids in revert_weight_conversion(model, ids).items()
        }

    def _locate(self, name: str, element_ids: torch.Tensor) -> _Target:
        owner = bisect.bisect_right(self._starts, int(element_ids.reshape(-1)[0])) - 1
        param_name = self._names[owner]
        local = element_ids.reshape(-1) - self._starts[owner]
        if int(local.min()) < 0 or int(local.max()) >= self._params[param_name].numel():
            raise RuntimeError(f"checkpoint tensor {name} spans several parameters; cannot map it")
        offset = int(local[0])
        if torch.equal(local, torch.arange(offset, offset + local.numel())):
            return _Target(param_name, element_ids.shape, offset, None)
        return _Target(param_name, element_ids.shape, -1, local)

    @property
    def expected_shapes(self) -> dict[str, torch.Size]:
        """Checkpoint name -> shape, i.e. exactly what update_weights must receive."""
        return {name: target.shape for name, target in self._targets.items()}

    def load(self, named_tensors: Iterable[tuple[str, torch.Tensor]], complete: bool = True) -> None:
        """Write a full set of checkpoint tensors into the model, all or nothing.

        Every name is checked before anything is written, so a bad update leaves the old weights intact.
        `complete=False` accepts a subset (a changed-only weight sync): the other tensors keep their values.
        """
        staged: dict[str, torch.Tensor] = {}
        unknown: list[str] = []
        misshaped: dict[str, str] = {}
        for name, tensor in named_tensors:
            target = self._targets.get(name)
            if target is None:
                unknown.append(name)
            elif name in staged:
                raise WeightUpdateError(f"update_weights got {name} twice; send each HF tensor once")
            elif tensor.shape != target.shape or not tensor.is_floating_point():
                misshaped[name] = (f"{name} (got {tuple(tensor.shape)} {tensor.dtype}, "
                                   f"expected {tuple(target.shape)} floating point)")
            else:
                staged[name] = tensor
        missing = sorted(set(self._targets) - set(staged) - set(misshaped)) if complete else []
        if unknown or missing or misshaped:
            raise WeightUpdateError(_mismatch_message(unknown, missing, list(misshaped.values())))
        with torch.no_grad():
            for name, tensor in staged.items():
                self._write(self._targets[name], tensor)

    def _write(self, target: _Target, tensor: torch.Tensor) -> None:
        flat = self._params[target.param_name].data.view(-1)
        source = tensor.detach().reshape(-1).to(device=flat.device, dtype=flat.dtype)
        if target.index is None:
            flat[target.offset:target.offset + source.numel()].copy_(source)
        else:
            flat[target.index.to(flat.device)] = source


def _mismatch_message(unknown: list[str], missing: list[str], misshaped: list[str]) -> str:
    parts = ["update_weights: the tensors do not match the model's HF checkpoint layout "
             "(send every tensor save_pretrained would write, under its checkpoint name, full and unsharded)"]
    for label, names in (("unknown", unknown), ("missing", missing), ("mis-shaped", misshaped)):
        if names:
            listed = ", ".join(names[:_MAX_LISTED]) + (f", ... ({len(names)} in all)" if len(names) > _MAX_LISTED else "")
            parts.append(f"{label}: {listed}")
    return "; ".join(parts)
