"""Hugging Face safetensors <-> a sharded megatron model, through the bridge's name/layout mapping.

Loading: every rank reads only the HF tensors its own parameters need and slices its TP/ETP shard
locally (no scatter), so a rank never holds more than one full tensor at a time. Every HF tensor
must be used and every megatron parameter filled, or the load fails naming the tensor.
Exporting: megatron's shards are gathered over TP/EP/PP by the bridge and come out under HF names.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from grpo_megatron.errors import UserError
from grpo_megatron.models.provider import PolicyModel, build_model, load_hf_config, model_dims
from grpo_megatron.parallel import ParallelLayout, init_model_parallel
from grpo_megatron.ranks import is_rank0, multi_rank

# HF tensors that carry no weights of their own (recomputed buffers).
_IGNORED_HF_TENSORS = ("rotary_emb.inv_freq",)
_SHARD_BYTES = 2 * 1024**3


class WeightMismatchError(UserError, ValueError):
    """HF weights and the megatron model disagree (missing, left-over or mis-shaped tensors)."""


class SafetensorsReader:
    """Random access by name to the tensors of an HF checkpoint directory (sharded or not)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            self.file_of = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors files in {self.path}")
            self.file_of = {}
            for file in files:
                with safe_open(file, framework="pt") as f:
                    self.file_of.update({name: file.name for name in f.keys()})
        self._handles = {}

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def names(self) -> set[str]:
        return set(self.file_of)

    def get(self, name: str) -> torch.Tensor:
        file = self.file_of[name]
        if file not in self._handles:
            self._handles[file] = safe_open(self.path / file, framework="pt")
        return self._handles[file].get_tensor(name)


def build_loaded_policy(hf_path: str | Path, layout: ParallelLayout, **build_overrides) -> PolicyModel:
    """Model-parallel groups for `layout`, the model built from the HF config, the HF weights loaded into it:
    what every standalone worker (export, weight push, benchmarks) does after `init_distributed`."""
    hf_config = load_hf_config(hf_path)
    init_model_parallel(layout, **model_dims(hf_config))
    model = build_model(hf_config, layout, **build_overrides)
    load_hf_weights(model, hf_path)
    return model


def load_hf_weights(model: PolicyModel, hf_path: str | Path) -> None:
    """Fill this rank's parameters from an HF checkpoint; strict about names and shapes."""
    reader = SafetensorsReader(hf_path)
    bridge = model.bridge
    mpu = bridge.mpu
    used: set[str] = set()
    for chunk in model.unwrapped():
        state = chunk.state_dict()
        for local, global_name in bridge._weight_name_mapping_mcore_local_to_global(chunk).items():
            if "_extra_state" in local:
                continue
            hf_names = bridge._weight_name_mapping_mcore_to_hf(global_name)
            missing = [n for n in hf_names if n not in reader]
            if missing:
                raise WeightMismatchError(
                    f"{hf_path}: missing HF tensor(s) {missing} needed for megatron parameter {global_name}")
            hf_tensors = [reader.get(n) for n in hf_names]
            param = state[local]
            shard = _shard_for_rank(bridge, global_name, hf_names, hf_tensors, param, mpu)
            with torch.no_grad():
                param.copy_(shard)
            used.update(hf_names)
    _check_all_used(reader, used, model, hf_path)


def _shard_for_rank(bridge, global_name, hf_names, hf_tensors, param, mpu) -> torch.Tensor:
    try:
        full = bridge._weight_to_mcore_format(global_name, hf_tensors)
        expert = ".mlp.experts." in global_name
        size, rank = (mpu.etp_size, mpu.etp_rank) if expert else (mpu.tp_size, mpu.tp_rank)
        shard = bridge._weight_split_across_tp(global_name, full, param, size)[rank] if size > 1 else full
    except (RuntimeError, AssertionError, ValueError) as exc:
        raise WeightMismatchError(
            f"HF tensor(s) {hf_names} with shapes {[tuple(t.shape) for t in hf_tensors]} do not fit "
            f"megatron parameter {global_name} {tuple(param.shape)}: {exc}") from exc
    if shard.shape != param.shape:
        raise WeightMismatchError(
            f"HF tensor(s) {hf_names} with shapes {[tuple(t.shape) for t in hf_tensors]} give a shard of "
            f"shape {tuple(shard.shape)} for megatron parameter {global_name}, which has {tuple(param.shape)}; "
            "is the checkpoint's config.json the one its weights were saved with?")
    return shard.to(param.dtype)


def _check_all_used(reader: SafetensorsReader, used: set[str], model: PolicyModel, hf_path) -> None:
    if multi_rank():
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, used)
        used = set().union(*everyone)
    leftover = {n for n in reader.names() - used if not n.endswith(_IGNORED_HF_TENSORS)}
    if getattr(model.hf_config, "tie_word_embeddings", False):
        leftover.discard("lm_head.weight")
    if leftover:
        raise WeightMismatchError(
            f"{hf_path}: {len(leftover)} HF tensor(s) not used by the megatron model, e.g. "
            f"{sorted(leftover)[:5]}; the config does not describe these weights")


@torch.no_grad()
def export_hf_weights(model: PolicyModel) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, full tensor) for the whole model; every rank must iterate it (collectives).

    Without grad mode: the bridge broadcasts parameters in place over the pipeline group, which in
    grad mode records the broadcast as the parameters' autograd history.
    """
    mpu = model.bridge.mpu
    if mpu.ep_size == 1 and mpu.etp_size not in (1, mpu.tp_size):
        raise NotImplementedError(
            "export with expert_parallel=1 needs expert_tensor_parallel equal to tensor_parallel or 1")
    if mpu.tp_size == mpu.pp_size == mpu.ep_size == mpu.etp_size == 1:
        yield from _export_unsharded(model)
        return
    for name, tensor in model.bridge.export_weights(model.unwrapped()):
        yield name, tensor.detach()


def _export_unsharded(model: PolicyModel) -> Iterator[tuple[str, torch.Tensor]]:
    """The same conversion without the bridge's per-tensor collectives, which a model that is not
    sharded does not need (they cost more than the conversion itself: ~10x on the CPU example)."""
    bridge = model.bridge
    for chunk in model.unwrapped():
        global_names = bridge._weight_name_mapping_mcore_local_to_global(chunk, consider_ep=False)
        for local, param in chunk.named_parameters():
            yield from zip(*bridge._weight_to_hf_format(global_names[local], param.detach()))


def save_hf_checkpoint(
    model: PolicyModel, output: str | Path, tokenizer_path: str | Path | None = None, dtype: torch.dtype | None = None
) -> Path | None:
    """Write the model as an HF checkpoint (safetensors + config [+ tokenizer]) atomically on rank 0.

    The files go to a temporary directory beside `output` that is renamed into place only when
    complete, so an interrupted export never leaves a half-written checkpoint at `output`.
    """
    output = Path(output)
    rank0 = is_rank0()
    weights = export_hf_weights(model)
    if not rank0:
        for _ in weights:
            pass
        return None
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        _write_safetensors(weights, staging, dtype)
        model.hf_config.save_pretrained(staging)
        if tokenizer_path is not None:
            for file in Path(tokenizer_path).glob("*"):
                if file.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
                    shutil.copy2(file, staging / file.name)
        if output.exists():
            shutil.rmtree(output)
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def _write_safetensors(weights, directory: Path, dtype: torch.dtype | None) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    seen = set()
    for name, tensor in weights:
        if name in seen:
            continue  # tied embeddings come out twice
        seen.add(name)
        tensor = tensor.to("cpu", dtype or tensor.dtype).contiguous().clone()
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > _SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], directory / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / file, metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
