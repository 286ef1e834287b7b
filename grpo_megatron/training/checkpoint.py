"""Run checkpoints: policy + optimizer (megatron dist_checkpointing) and trainer state, atomically.

`run_dir/checkpoints/step_000010/` is complete or absent: it is written under a staging name and
renamed only after every rank finished, with `trainer_state.json` (step, LR schedule, data loader,
RNG) inside. Older checkpoints beyond `keep_last` are removed only after a new one is complete.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from grpo_megatron.models.mcore_checkpoint import (
    DEFAULT_OPTIMIZER_FORMAT, METADATA_FILE, load_mcore_checkpoint, save_mcore_checkpoint)
from grpo_megatron.ranks import is_rank0

TRAINER_STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (staging directories of interrupted saves are ignored)."""
    root = checkpoint_root(run_dir)
    if not root.exists():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / METADATA_FILE).exists() and (path / TRAINER_STATE).exists():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1][1] if checkpoints else None


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state().tolist()}


def set_rng_state(state: dict) -> None:
    random.setstate(_tuples(state["python"]))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state[0], np.array(numpy_state[1], dtype=np.uint32), *numpy_state[2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def save_run_checkpoint(run_dir, step: int, model, optimizer, trainer_state: dict, tokenizer_path, keep_last: int,
                        optimizer_format: str = DEFAULT_OPTIMIZER_FORMAT) -> Path:
    path = checkpoint_root(run_dir) / f"step_{step:06d}"
    state = {"step": step, "rng": rng_state(), **trainer_state}
    save_mcore_checkpoint(model, path, tokenizer_path=tokenizer_path, optimizer=optimizer, optimizer_format=optimizer_format,
                          metadata={"step": step}, extra_files={TRAINER_STATE: json.dumps(state, default=_np_default)})
    if is_rank0():
        for _, old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return path


def load_run_checkpoint(path: Path, model, optimizer) -> dict:
    load_mcore_checkpoint(model, path, optimizer=optimizer)
    state = json.loads((path / TRAINER_STATE).read_text())
    set_rng_state(state["rng"])
    return state


def _np_default(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value)}")
