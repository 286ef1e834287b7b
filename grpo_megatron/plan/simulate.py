"""One trainer rank of a job, simulated on fake CUDA (grpo_megatron.simulation) and read in the plan's terms.

Each rank runs in a fresh interpreter (the simulation's C++ shim must be preloaded before torch is imported).
A pipeline stage holds at most `pp - stage` micro-batches' activations under 1F1B, so the simulation runs
min(micro-batches, pp) of them: the same peak as the whole optimizer step, in a fraction of the time. Results
are cached by everything they depend on, so a fix search re-simulates only what a candidate changes; and on
disk (GRPO_PLAN_CACHE, default ~/.cache/grpo_megatron/plan), keyed by the spec and the source of the simulation
and the model builder, so a requeued job's preflight does not simulate again.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from grpo_megatron.plan import constants, extrapolate
from grpo_megatron.plan.job import Job, PlanInputError
from grpo_megatron.plan.positions import RankPosition
from grpo_megatron.plan.trainer_rank import TrainerRank


def rank_spec(job: Job, position: RankPosition, recompute: bool | None = None):
    """The simulation's RankSpec for `position` of `job` (recompute: the config's unless given)."""
    from grpo_megatron.simulation import RankSpec

    cfg, layout = job.cfg, job.layout
    recompute = cfg.model.recompute_activations if recompute is None else recompute
    distributed = cfg.train.distributed_optimizer if cfg.train.distributed_optimizer is not None else job.dp > 1
    micro = 1 if layout.pipeline_parallel == 1 else min(job.micro_batches, layout.pipeline_parallel)
    return RankSpec(model_config=json.loads(Path(job.shapes.source).read_text()), layout=layout, rank=position.rank,
                    world_size=job.world, seq_len=job.sequence, micro_batch_size=job.micro_batch_rows,
                    num_micro_batches=micro,
                    recompute="full" if recompute else "none", dtype=cfg.model.dtype,
                    distributed_optimizer=distributed, moe_dispatch="balanced",
                    # a receive skew exists only across an expert-parallel all-to-all: at EP 1 every rank holds every
                    # expert and gets all of its tokens' assignments whatever the routing
                    routing_skew=constants.ROUTING_SKEW if layout.expert_parallel > 1 else 1.0)


def to_trainer_rank(memory, dtype_bytes: int, other_recompute_peak: int | None = None) -> TrainerRank:
    """The simulation's RankMemory in the plan's terms: the log-prob peak is its forward-only pass over the same
    micro-batches (old policy; the reference pass adds the reference model's parameters). Without the
    distributed optimizer megatron's DDP keeps no param buffer (param_bytes 0): the parameters are then tensors of
    their own, exactly count x element size."""
    params = memory.param_bytes or (memory.dense_params + memory.expert_params) * dtype_bytes
    return TrainerRank(
        dense_params=memory.dense_params, expert_params=memory.expert_params, param_bytes=params,
        grad_bytes=memory.grad_buffer_bytes, optimizer_bytes=memory.main_param_bytes + memory.optimizer_state_bytes,
        static_bytes=memory.static_bytes, peak_bytes=memory.peak_bytes,
        logprob_peak_bytes=memory.logprob_peak_bytes,
        seconds=memory.seconds, other_recompute_peak_bytes=other_recompute_peak,
        extra={"coordinates": memory.coordinates, "by_category": memory.by_category})


def _code_digest() -> str:
    """What a simulation's result depends on besides its spec: the simulation and model-building code, torch and
    megatron-core."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted([*package.glob("simulation/*"), *package.glob("models/*.py"), package / "parallel.py"]):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    for dist in ("torch", "megatron-core"):
        digest.update(importlib.metadata.version(dist).encode())
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    root = os.environ.get("GRPO_PLAN_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "grpo_megatron" / "plan"


class CachedSimulator:
    """`simulate(job, position) -> TrainerRank`, each distinct RankSpec simulated once.

    `compare_recompute` also simulates the step with recompute toggled, for the report's "other recompute" row
    (the activation memory with and without recompute). `extrapolate_layers` simulates each rank with 1 and 2
    layers per pipeline chunk (both at once) and extends the line to its real layer count (plan/extrapolate.py)."""

    def __init__(self, compare_recompute: bool = False, timeout_s: float = 1800.0, use_disk: bool = True,
                 extrapolate_layers: bool = False):
        self.compare_recompute = compare_recompute
        self.extrapolate_layers = extrapolate_layers
        self.timeout_s = timeout_s
        self.use_disk = use_disk
        self.simulated = 0  # simulations run by this object (not found in a cache)
        self._cache: dict[str, object] = {}
        self._from_disk: set[str] = set()
        self._lock = threading.Lock()

    def _memory(self, spec):
        from grpo_megatron.simulation import RankMemory, simulate_rank

        key = spec.to_json()
        if key in self._cache:
            return self._cache[key]
        path = cache_dir() / f"{hashlib.sha256((key + _code_digest()).encode()).hexdigest()[:24]}.json"
        if self.use_disk and path.is_file():
            memory = RankMemory(**json.loads(path.read_text()))
            self._from_disk.add(key)
        else:
            memory = simulate_rank(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)},
                                   timeout=self.timeout_s)
            with self._lock:
                self.simulated += 1
            if self.use_disk:
                path.parent.mkdir(parents=True, exist_ok=True)
                partial = path.with_suffix(f".{os.getpid()}.tmp")
                partial.write_text(json.dumps(dataclasses.asdict(memory)))
                partial.replace(path)
        self._cache[key] = memory
        return memory

    def _memory_at_size(self, spec):
        """The rank's memory at its real layer count: simulated, or extrapolated from 1 and 2 layers per chunk."""
        per_chunk = extrapolate.layers_per_chunk(spec)
        if not self.extrapolate_layers or per_chunk <= 2:
            return self._memory(spec), False
        try:
            short = [extrapolate.reduced_spec(spec, n) for n in (1, 2)]
        except extrapolate.LayersNotUniform as exc:
            raise PlanInputError(str(exc)) from None
        with ThreadPoolExecutor(len(short)) as pool:  # each simulation is a process of its own
            one, two = pool.map(self._memory, short)
        return extrapolate.extrapolate(one, two, per_chunk), all(s.to_json() in self._from_disk for s in short)

    def __call__(self, job: Job, position: RankPosition) -> TrainerRank:
        spec = rank_spec(job, position)
        memory, cached = self._memory_at_size(spec)
        other = None
        if self.compare_recompute:
            other = self._memory_at_size(rank_spec(job, position, not job.cfg.model.recompute_activations))[0]
            other = other.peak_bytes
        rank = to_trainer_rank(memory, job.dtype_bytes, other)
        rank.extra["cached"] = cached
        rank.extra["extrapolated"] = self.extrapolate_layers and extrapolate.layers_per_chunk(spec) > 2
        return rank
