"""When a plan does not fit: try single changes, re-plan each, and name the first that fits.

Candidates come cheapest first, by what they cost the user: changes on the same hardware that cost little
speed (give the parameters back to the host around generation too; a smaller SGLang pool while the KV cache
still holds full samples), then ones that cost compute (activation recompute) or communication (a larger
expert-parallel size), then more hardware (dedicated rollout nodes, then more trainer nodes). Simulations are
cached by what they depend on, so candidates that change only the rollout side or the offload cost nothing.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from grpo_megatron.parallel import ParallelLayoutError
from grpo_megatron.plan.job import OFFLOAD_PARAMS_KEY, Job, with_changes
from grpo_megatron.plan.planner import Plan, Simulator, make_plan


@dataclass
class Fix:
    change: str  # one line naming the change, as the user makes it
    plan: Plan  # the re-planned job with the change


def candidates(job: Job) -> Iterator[tuple[str, Job]]:
    cfg, alloc, layout, shapes = job.cfg, job.alloc, job.layout, job.shapes
    if job.offload_train_state and not job.offload_params:
        key = OFFLOAD_PARAMS_KEY
        yield f"offload the parameters too around generation: {key}: true (--{key} true)", \
            with_changes(job, config={key: True})
    if job.colocated:
        fraction = round(alloc.sglang_fraction - 0.05, 2)
        while fraction >= 0.2:
            yield f"lower the colocated SGLang pool: SGLANG_MEM_FRACTION={fraction}", \
                with_changes(job, alloc={"sglang_fraction": fraction})
            fraction = round(fraction - 0.05, 2)
    if not cfg.model.recompute_activations:
        yield "recompute activations: model.recompute_activations: true (--recompute-activations)", \
            with_changes(job, config={"model.recompute_activations": True})
    ep = layout.expert_parallel * 2
    while shapes.is_moe and shapes.experts % ep == 0 and job.world % (ep * layout.etp * layout.pipeline_parallel) == 0:
        yield f"a larger expert-parallel size: parallel.expert_parallel: {ep} (--expert-model-parallel-size {ep})", \
            with_changes(job, layout={"expert_parallel": ep})
        ep *= 2
    if job.servers_on_gpus and alloc.rollout_nodes == 0:
        for extra in (1, 2, 4, 8):
            yield f"dedicated rollout nodes: ROLLOUT_NODES={extra} sbatch --nodes={alloc.nodes + extra}", \
                with_changes(job, alloc={"nodes": alloc.nodes + extra, "rollout_nodes": extra})
    for factor in (2, 4):
        nodes = alloc.trainer_nodes * factor + alloc.rollout_nodes
        yield f"more trainer nodes: sbatch --nodes={nodes}", with_changes(job, alloc={"nodes": nodes})


def find_fix(job: Job, simulate: Simulator) -> Fix | None:
    """The first candidate whose re-planned job fits (every candidate is planned in full, not guessed)."""
    for change, candidate in candidates(job):
        try:
            plan = make_plan(candidate, simulate)
        except ParallelLayoutError:
            continue
        if plan.fits:
            return Fix(change, plan)
    return None
