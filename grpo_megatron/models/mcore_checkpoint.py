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

from grpo_megatron.models.provider import PolicyModel

MODEL_SUBDIR = "model"
HF_SUBDIR = "hf"
METADATA_FILE = "metadata.json"
_TOKENIZER_PREFIXES = ("tokenizer", "special_tokens", "vocab", "merges", "chat_template")


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def sharded_model_state(model: PolicyModel) -> dict:
    return {f"chunk{i}": chunk.sharded_state_dict() for i, chunk in enumerate(model.unwrapped())}


def _full_state(model: PolicyModel, optimizer, is_loading: bool) -> dict:
    state = sharded_model_state(model)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading)
    return state


def save_mcore_checkpoint(
    model: PolicyModel, output: str | Path, *, tokenizer_path: str | Path | None = None,
    metadata: dict | None = None, optimizer=None, extra_files: dict[str, str] | None = None,
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
    dist_checkpointing.save(_full_state(model, optimizer, is_loading=False), str(staging / MODEL_SUBDIR))
    _barrier()
    if _is_rank0():
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text)
        model.hf_config.save_pretrained(staging / HF_SUBDIR)
        if tokenizer_path is not None:
            for file in Path(tokenizer_path).iterdir():
                if file.name.startswith(_TOKENIZER_PREFIXES):
                    shutil.copy2(file, staging / HF_SUBDIR / file.name)
        meta = {"dtype": str(model.dtype).replace("torch.", ""), "saved_layout": model.layout.to_dict(),
                "format": "grpo_megatron/torch_dist", **(metadata or {})}
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

    path = Path(path)
    read_checkpoint_config(path)
    loaded = dist_checkpointing.load(_full_state(model, optimizer, is_loading=True), str(path / MODEL_SUBDIR))
    for i, chunk in enumerate(model.unwrapped()):
        chunk.load_state_dict(loaded[f"chunk{i}"], strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])


def dtype_from_name(name: str) -> torch.dtype:
    dtypes = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
              "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(dtypes)}")
    return dtypes[name]
