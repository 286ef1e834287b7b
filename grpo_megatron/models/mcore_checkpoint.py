"""Megatron distributed checkpoints (torch_dist) of a policy model, loadable at any parallel layout.

A checkpoint directory holds `model/` (megatron dist_checkpointing files), `hf/` (the HF config and
tokenizer the model came from, so the model can be rebuilt without the original HF directory) and
`metadata.json` (dtype, the layout it was saved at, free-form extras). Writes go to a staging
directory that is renamed into place when every rank has finished, so a crash leaves no partial
checkpoint under the final name.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import transformers

from grpo_megatron.errors import UserError
from grpo_megatron.models.provider import PolicyModel
from grpo_megatron.ranks import is_rank0

MODEL_SUBDIR = "model"
HF_SUBDIR = "hf"
METADATA_FILE = "metadata.json"
_TOKENIZER_PREFIXES = ("tokenizer", "special_tokens", "vocab", "merges", "chat_template")
# One tensor, two names. megatron-core's local layer spec saves every layer's pre-MLP norm under the TE
# spec's fused-norm name (gpt_layer_specs.get_gpt_layer_local_spec: sharded_state_dict_keys_map), but the
# TE spec keeps an MoE layer's pre-MLP norm as its own module (`pre_mlp_layernorm=... if num_experts`): a
# CPU-converted MoE checkpoint names it one way, a GPU model asks for it the other way (and vice versa).
_KEY_ALIASES = {
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
_EXTRA_STATE = "_extra_state"


class CheckpointMismatchError(UserError, ValueError):
    """The checkpoint lacks weights the model needs (another architecture or layer spec)."""


_is_rank0 = is_rank0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def sharded_model_state(model: PolicyModel) -> dict:
    return {f"chunk{i}": chunk.sharded_state_dict() for i, chunk in enumerate(model.unwrapped())}


OPTIMIZER_FORMATS = {
    "dp_reshardable": {"distrib_optim_sharding_type": "dp_reshardable"},
    "fully_reshardable": {"distrib_optim_sharding_type": "fully_reshardable"},
}
"""How megatron lays out a distributed optimizer's state in a checkpoint (the plain optimizer ignores it).
`dp_reshardable`: each rank writes its own shards, no gather and no host copy of the whole state; a resume may
change the data-parallel size only. `fully_reshardable`: one tensor per parameter and state, gathered from the
DP shards into host buffers of the whole model-parallel shard's fp32 state on every rank (at save and at load);
a resume may change any of TP, PP, EP and DP (distrib_optimizer.py, `sharded_param_state_*`; benchmarks/README.md
has the host memory of each). megatron-core 0.16.1's default, `fully_sharded_model_space`, fails to save
("ShardedTensor.flattened_range is not supported")."""
DEFAULT_OPTIMIZER_FORMAT = "dp_reshardable"
_UNRECORDED_OPTIMIZER_FORMAT = "fully_reshardable"  # what checkpoints written before the choice was recorded hold


def _full_state(model: PolicyModel, optimizer, optimizer_format: str) -> dict:
    state = sharded_model_state(model)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=False,
                                                          metadata=OPTIMIZER_FORMATS[optimizer_format])
    return state


def save_mcore_checkpoint(
    model: PolicyModel, output: str | Path, *, tokenizer_path: str | Path | None = None,
    metadata: dict | None = None, optimizer=None, extra_files: dict[str, str] | None = None,
    optimizer_format: str = DEFAULT_OPTIMIZER_FORMAT,
) -> Path:
    """Save the model (and optionally its megatron optimizer) at `output` atomically.

    `extra_files` (name -> text) are written by rank 0 inside the checkpoint before it is renamed
    into place, so they are exactly as complete as the weights.
    """
    from megatron.core import dist_checkpointing

    output = Path(output)
    staging = output.with_name(f".{output.name}.staging")
    if _is_rank0():
        shutil.rmtree(staging, ignore_errors=True)
        (staging / MODEL_SUBDIR).mkdir(parents=True)
    _barrier()
    dist_checkpointing.save(_full_state(model, optimizer, optimizer_format), str(staging / MODEL_SUBDIR))
    _barrier()
    if _is_rank0():
        _forget_save_path(staging / MODEL_SUBDIR)
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text)
        model.hf_config.save_pretrained(staging / HF_SUBDIR)
        if tokenizer_path is not None:
            for file in Path(tokenizer_path).iterdir():
                if file.name.startswith(_TOKENIZER_PREFIXES):
                    shutil.copy2(file, staging / HF_SUBDIR / file.name)
        meta = {"dtype": str(model.dtype).replace("torch.", ""), "saved_layout": model.layout.to_dict(),
                "layer_spec": "transformer_engine" if getattr(model.bridge, "_use_te", False) else "local",
                "distributed_optimizer": bool(getattr(getattr(model.chunks[0], "ddp_config", None),
                                                      "use_distributed_optimizer", False)),
                "format": "grpo_megatron/torch_dist", "optimizer_format": optimizer_format, **(metadata or {})}
        (staging / METADATA_FILE).write_text(json.dumps(meta, indent=2))
        if output.exists():
            shutil.rmtree(output)
        os.replace(staging, output)
    _barrier()
    return output


def read_checkpoint_config(path: str | Path) -> tuple[transformers.PretrainedConfig, dict]:
    """The HF config and metadata stored with a checkpoint (no model is built)."""
    path = Path(path)
    if not (path / METADATA_FILE).exists() or not (path / MODEL_SUBDIR).is_dir():
        raise FileNotFoundError(
            f"{path} is not a grpo_megatron megatron checkpoint (expected {METADATA_FILE} and {MODEL_SUBDIR}/); "
            "create one with tools/convert_hf_to_megatron.py")
    config = transformers.AutoConfig.from_pretrained(path / HF_SUBDIR)
    return config, json.loads((path / METADATA_FILE).read_text())


def load_mcore_checkpoint(model: PolicyModel, path: str | Path, optimizer=None) -> None:
    """Load weights (and the optimizer, if given) saved at any layout into `model` at the current layout."""
    from megatron.core import dist_checkpointing

    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    path = Path(path)
    _, meta = read_checkpoint_config(path)
    saved = {item.key for item in load_sharded_metadata(str(path / MODEL_SUBDIR)).values()}
    state = sharded_model_state(model)
    missing = _match_checkpoint_keys(state, saved)
    if missing:
        raise CheckpointMismatchError(
            f"{path} lacks {len(missing)} weight(s) this model needs, e.g. {', '.join(sorted(missing)[:3])} "
            f"(saved with the {meta.get('layer_spec', 'unrecorded')} layer spec from "
            f"{meta.get('source_hf_path', 'an unrecorded HF model')}): check model.hf_path is the model the "
            f"checkpoint came from, or reconvert it with tools/convert_hf_to_megatron.py")
    if optimizer is not None:
        _check_optimizer_reshard(model, path, meta)
        state["optimizer"] = _optimizer_state_to_load(optimizer, state, saved, path, meta)
    loaded = dist_checkpointing.load(state, str(path / MODEL_SUBDIR))
    for i, chunk in enumerate(model.unwrapped()):
        result = chunk.load_state_dict(loaded[f"chunk{i}"], strict=False)
        _check_only_extra_state_missing(result, path)
    if optimizer is not None:
        with torch.no_grad():  # dp_reshardable copies into fp32 runs' main params, views of the (leaf) model params
            optimizer.load_state_dict(loaded["optimizer"])


def _match_checkpoint_keys(state: dict, saved: set[str]) -> list[str]:
    """Point each requested tensor at the name the checkpoint stores it under (_KEY_ALIASES) and drop the
    `_extra_state` entries the checkpoint lacks: TransformerEngine's per-layer fp8 metadata, absent from a
    checkpoint written with the local spec (CPU); TE starts it afresh, as for a new model. Returns the
    keys still missing."""
    missing = []
    for name, item in list(state.items()):
        if isinstance(item, dict):
            missing += _match_checkpoint_keys(item, saved)
            continue
        key = getattr(item, "key", None)
        if key is None or key in saved:
            continue
        alias = next((key[:-len(a)] + b for a, b in _KEY_ALIASES.items() if key.endswith(a)), None)
        if alias in saved:
            item.key = alias
        elif key.endswith(_EXTRA_STATE):
            del state[name]
        else:
            missing.append(key)
    return missing


def _optimizer_state_to_load(optimizer, state: dict, saved: set[str], path: Path, meta: dict) -> dict:
    """The optimizer's sharded state to load, refused with the ways out when the checkpoint keys it otherwise.

    Optimizer state is keyed by megatron's optimizer structure, which follows the layout: under expert
    parallelism the dense and expert parameters get separate (chained, `chained_N.`-prefixed) optimizers, and
    a distributed optimizer keeps fp32 main parameters a plain one does not.
    """
    _init_adam_state(optimizer)
    optimizer_format = meta.get("optimizer_format", _UNRECORDED_OPTIMIZER_FORMAT)
    optimizer_state = optimizer.sharded_state_dict(state, is_loading=True,
                                                   metadata=OPTIMIZER_FORMATS[optimizer_format])
    missing = sorted(k for k in _sharded_tensor_keys(optimizer_state) if k not in saved)
    if missing:
        layout = meta.get("saved_layout") or {}
        raise CheckpointMismatchError(
            f"{path} holds optimizer state this run cannot use (saved with train.distributed_optimizer="
            f"{meta.get('distributed_optimizer', False)}, expert_parallel={layout.get('expert_parallel')}, "
            f"optimizer format {optimizer_format}, which reshards {_RESHARDS[optimizer_format]}; "
            f"this run needs e.g. {missing[0]}): resume "
            f"with those settings, or start a new run from these weights with model.megatron_path={path} (the "
            f"optimizer state then starts afresh)")
    return optimizer_state


_RESHARDS = {"dp_reshardable": "the data-parallel size only", "fully_reshardable": "any layout"}
_MODEL_PARALLEL = ("tensor_parallel", "pipeline_parallel", "virtual_pipeline_parallel", "expert_parallel",
                   "expert_tensor_parallel", "context_parallel")


def _check_optimizer_reshard(model: PolicyModel, path: Path, meta: dict) -> None:
    """A dp_reshardable optimizer state follows the saving run's DP buckets, which every model-parallel size
    shapes: refused by name before megatron meets shards of other shapes under the same keys."""
    if not meta.get("distributed_optimizer") or meta.get("optimizer_format") != "dp_reshardable":
        return  # a plain optimizer's state is keyed by parameter whatever the format
    saved, now = meta.get("saved_layout") or {}, model.layout.to_dict()
    changed = [f"{key} {saved.get(key)} -> {now.get(key)}" for key in _MODEL_PARALLEL if saved.get(key) != now.get(key)]
    if changed:
        raise CheckpointMismatchError(
            f"{path} holds optimizer state this run cannot use: the distributed optimizer's, in the dp_reshardable "
            f"format, which reshards the data-parallel size only "
            f"({', '.join(changed)}): resume at the saved layout, or start a new run from these weights with "
            f"model.megatron_path={path} (the optimizer state then starts afresh); runs that must change layout "
            f"on resume save with checkpoint.optimizer_format: fully_reshardable")


def _init_adam_state(optimizer) -> None:
    """Zero Adam state (step 0) for parameters that have none yet, i.e. in a run resuming before its first step.

    Without Apex/TransformerEngine, megatron 0.16.1's DistributedOptimizer.state_dict reads `step` from torch
    Adam's per-parameter state and asserts there is exactly one value (distrib_optimizer.py ~642), and its
    load copies into the existing per-parameter entries only: a fresh optimizer has neither. The loaded
    checkpoint overwrites all of it (with grpo_megatron.platform's patch for the step).
    """
    for wrapper in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(wrapper, "optimizer", None)
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            for group in inner.param_groups:
                for p in group["params"]:
                    if not inner.state[p]:
                        inner.state[p] = {"step": torch.zeros((), dtype=torch.float32),
                                          "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}


def _sharded_tensor_keys(item):
    return (tensor.key for tensor in _sharded_tensors(item))


def _sharded_tensors(item):
    from megatron.core.dist_checkpointing import ShardedTensor

    if isinstance(item, ShardedTensor):
        yield item
    elif isinstance(item, dict):
        for value in item.values():
            yield from _sharded_tensors(value)
    elif isinstance(item, (list, tuple)):
        for value in item:
            yield from _sharded_tensors(value)


def _check_only_extra_state_missing(result, path: Path) -> None:
    """The dropped `_extra_state` entries may be missing from the loaded dict; any other mismatch is an error."""
    other = [k for k in result.missing_keys if not k.endswith(_EXTRA_STATE)] + list(result.unexpected_keys)
    if other:
        raise CheckpointMismatchError(f"{path} does not match this model ({', '.join(sorted(other)[:3])}); "
                                      f"reconvert it with tools/convert_hf_to_megatron.py")


def _forget_save_path(model_dir: Path) -> None:
    """torch.distributed.checkpoint records the directory it wrote to (the staging path, wrong after the
    rename and a path of the machine that saved) in `.metadata`; loading does not use it, so drop it."""
    import pickle

    file = model_dir / ".metadata"
    with open(file, "rb") as f:
        metadata = pickle.load(f)
    if getattr(metadata, "storage_meta", None) is not None:
        metadata.storage_meta.checkpoint_id = None
        with open(file, "wb") as f:
            pickle.dump(metadata, f)


def dtype_from_name(name: str) -> torch.dtype:
    dtypes = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
              "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(dtypes)}")
    return dtypes[name]
