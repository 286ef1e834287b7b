"""Every shipped Slurm config, dry-run at the allocation its script ships with, fits its 80 GB GPUs with the rollout
placement it ships with (colocated, or dedicated rollout nodes), every simulated rank's parameters equal the hand
count, and the plan's static bytes are megatron's buffers.

Each distinct rank is a real fake-CUDA simulation in a fresh interpreter: ~25 s for the tiny model, 2.5 min of one
core for a 30B rank (6-9 min of wall time on this shared 2-core machine), more for the 235B stages. The default
suite plans tiny_cpu.yaml (the whole path: simulation, budget, verdict); the 30B and 235B configs run under
`-m slow` (the two 30B configs share one simulated rank within a session)."""
from __future__ import annotations

import pytest

from grpo_megatron.plan.cli import run
from grpo_megatron.plan.simulate import CachedSimulator
from tests.plan.shipped import shipped_jobs

SLOW = {"gspo_moe.yaml", "grpo_routing_replay.yaml", "gspo_qwen3_235b.yaml"}


@pytest.fixture(scope="module")
def simulator():
    return CachedSimulator()


def _cases():
    for job in shipped_jobs():
        marks = [pytest.mark.slow] if job.config.name in SLOW else []
        yield pytest.param(job, id=job.config.name, marks=marks)


@pytest.mark.parametrize("job", _cases())
def test_shipped_config_fits_at_its_default_allocation(job, simulator):
    status, plan, _ = run(job.argv() + ["--no-fix"], simulate=simulator)
    assert status == 0, plan.problems
    phases = {p.name for r in plan.ranks for p in r.phases}
    if plan.job.servers_on_gpus and job.rollout_nodes == 0:  # colocated: the servers' pool is on the trainer GPUs
        assert "generate" in phases and plan.rollout.fraction == 0.5 and plan.dedicated is None
    elif plan.job.servers_on_gpus:  # dedicated rollout nodes: a server GPU of its own, checked too
        assert "generate" not in phases and plan.dedicated.total <= plan.job.alloc.gpu_memory
    assert plan.rollout is None or plan.rollout.problem() is None
    for rank in plan.ranks:
        assert (rank.rank.dense_params, rank.rank.expert_params) == rank.hand_count, rank.position
        r = rank.rank
        # the static state is the three buffers (and a little else: rotary tables, the loss scale, ...)
        assert r.param_bytes + r.grad_bytes + r.optimizer_bytes <= r.static_bytes <= 1.02 * (
            r.param_bytes + r.grad_bytes + r.optimizer_bytes) + (64 << 20)
        assert r.peak_bytes > r.static_bytes
        assert rank.peak.total <= plan.job.alloc.gpu_memory
