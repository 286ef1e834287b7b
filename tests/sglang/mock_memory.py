"""The mock server's /release_memory_occupation and /resume_memory_occupation, with SGLang 0.5.23's memory-saver
semantics (see memory_occupation)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from tests.sglang.mock_server import MockState


def memory_occupation(state: MockState, path: str, req: dict) -> tuple[int, dict]:
    """Release/resume the tagged regions (None = all), as SGLang 0.5.23 does:
    - without --enable-memory-saver nothing is freed (the noop memory-saver adapter), so weights survive;
    - with it, a release of `weights` drops their memory unless --enable-weights-cpu-backup
      (model_runner_components/load_model_utils.py ~307-325: the weights region's enable_cpu_backup), and resume
      maps back memory that holds no weights, restoring only the model's buffers
      (managers/scheduler_components/weight_updater.py ~368-403, _export/_import_static_state). The weight
      version (/model_info) is the tokenizer manager's and survives. Garbage here is random values.
    Loading weights into released memory is refused here (SGLang would write to unmapped memory)."""
    tags = set(req.get("tags") or ["weights", "kv_cache", "cuda_graph"])
    if path == "/release_memory_occupation":
        state.released |= tags
    else:
        if "weights" in tags & state.released and state.memory_saver and not state.weights_cpu_backup:
            _lose_weights(state)
        state.released -= tags
    state.log.append(f"({path.strip('/')} {','.join(sorted(tags))})")
    return 200, {"success": True, "message": ""}


def _lose_weights(state: MockState) -> None:
    generator = torch.Generator().manual_seed(len(state.log))
    for rank in state.ranks:
        for name, tensor in rank.items():
            rank[name] = torch.randn(tensor.shape, generator=generator).to(tensor.dtype)
    with state.lock:
        current = list(state.ranks[0].items())
        state.engine.update_weights(current, 0)
        state.layout.load(current)
