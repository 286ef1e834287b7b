"""One rank of a GPU training job, simulated on a CPU: the real model, real process groups, exact device bytes.

A process pretends to be rank r of a world of N GPUs: tensors on "cuda" are `FakeTensor`s (shapes, dtypes and
devices, no data), the default process group is `cuda:fake` on torch's `FakeStore` (megatron's gloo groups
become `fake`), and `torch.cuda` answers as a one-GPU machine. The project's own `build_model` builds that
rank's megatron `GPTModel`, megatron's DDP and (distributed) optimizer wrap it, and one forward + backward +
optimizer step runs through megatron's pipeline schedule with the project's policy loss, while a dispatch mode
counts every live device byte. Seconds to a minute and ~0.5 GB of host memory per rank, whatever the model.

API
---
`simulate_rank(model_config, layout, rank, world_size, seq_len, micro_batch_size=1, num_micro_batches=1,
recompute="none", **options) -> RankMemory` runs the simulation in a fresh interpreter (the C++ shim must be
preloaded there) and returns:

* `dense_params`, `expert_params`: this rank's parameter counts (expert: megatron's `allreduce=False` params);
* `param_bytes`, `grad_buffer_bytes`: megatron DDP's contiguous param and grad buffers (dense + expert);
* `main_param_bytes`, `optimizer_state_bytes`: fp32 master shard and Adam state, as megatron's distributed
  optimizer shards them over (expert-)data-parallel ranks;
* `static_bytes`: counted live device bytes before the step (the sum of the above, within a few scalars);
* `peak_bytes`: the most live device bytes during forward, backward and optimizer step; `activation_peak_bytes`
  is `peak_bytes - static_bytes`; `logprob_peak_bytes`: the most during a forward-only log-prob pass over the
  same micro-batches (old-policy and reference passes); `coordinates`: tp/pp/dp/ep/etp/edp ranks;
  `by_category`: static bytes by what allocated them (model build + DDP, optimizer); `seconds`: wall time.

`model_config` is an HF `config.json` (path or dict): no weights, no tokenizer. `options` (see `RankSpec`):
`dtype` ("bfloat16"), `distributed_optimizer` (True), `moe_dispatch` ("balanced" with `routing_skew` >= 1, or
"capacity" with `capacity_factor`). Raises `SimulationError` with the worker's last error line.

Pieces, each usable alone: `shim` (build/preload/self-test of the C++ shim), `runtime.fake_gpu_rank(rank, world,
memory)` (the context), `memory.DeviceMemoryCounter` (live/peak bytes by category), `collectives`
(fake world, coalesced-collective fake kernels), `moe` (dispatch with known sizes), `rank.simulate_rank_here`.

What the numbers leave out (the analogue of `torch.cuda.max_memory_allocated`): CUDA context (~0.5 GiB per
process), cuBLAS/NCCL workspaces and communicator buffers, allocator fragmentation, TransformerEngine kernels
versus the local layer spec, and anything value-dependent (`.item()` answers 1; routing is balanced x skew).
Pinned to the GPU job's choices: SDPA runs the flash kernel (not the math path fake mode would pick), pipeline
stages exchange fixed shapes (`variable_seq_lengths=False`).
"""
from __future__ import annotations

import json
from pathlib import Path

from grpo_megatron.parallel import ParallelLayout
from grpo_megatron.simulation.rank import RankMemory, RankSpec

__all__ = ["RankMemory", "RankSpec", "SimulationError", "simulate_rank"]


class SimulationError(RuntimeError):
    """The simulated rank failed; the message carries the worker's error."""


def simulate_rank(model_config: str | Path | dict, layout: ParallelLayout, rank: int, world_size: int, seq_len: int,
                  micro_batch_size: int = 1, num_micro_batches: int = 1, recompute: str = "none", *,
                  timeout: float = 900, **options) -> RankMemory:
    """Simulate rank `rank` of `world_size` in a fresh interpreter (see the module docstring)."""
    from dataclasses import fields

    from grpo_megatron.simulation import shim

    if not isinstance(model_config, dict):
        path = Path(model_config)
        model_config = json.loads((path / "config.json" if path.is_dir() else path).read_text())
    spec = RankSpec(model_config=model_config, layout=layout, rank=rank, world_size=world_size, seq_len=seq_len,
                    micro_batch_size=micro_batch_size, num_micro_batches=num_micro_batches, recompute=recompute,
                    **options)
    run = shim.run_module("grpo_megatron.simulation.worker", [spec.to_json()], timeout=timeout,
                          env={**_environ(), "OMP_NUM_THREADS": "1"})
    line = next((l for l in reversed(run.stdout.splitlines()) if l.startswith("RANK_MEMORY ")), None)
    if line is None:
        errors = [l for l in run.stderr.splitlines() if "Error" in l or "error:" in l]
        raise SimulationError(f"rank {rank} of {world_size} failed (exit {run.returncode}): "
                              f"{errors[-1] if errors else run.stderr[-500:]}")
    data = json.loads(line[len("RANK_MEMORY "):])
    return RankMemory(**{f.name: data[f.name] for f in fields(RankMemory)})


def _environ() -> dict[str, str]:
    import os

    return dict(os.environ)
