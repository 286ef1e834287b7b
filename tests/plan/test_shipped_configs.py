"""Every shipped Slurm config, dry-run at the allocation its script ships with, fits its 80 GB GPUs with the rollout
placement it ships with (colocated, or dedicated rollout nodes), every simulated rank's parameters equal the hand
count, and the plan's static bytes are megatron's buffers.

The default suite plans every config with `--layers-extrapolate` (each distinct rank simulated with 1 and 2 layers
per pipeline stage at its real world size, hidden size and sequence length, extended to its real layer count:
seconds per rank; test_layers_extrapolate.py checks it against the full simulation). The full simulation of the
30B and 235B ranks (2.5 min of one core for a 30B rank, more for the 235B stages; 6-15 min of wall time on a shared
2-core machine) runs under `-m slow`, and there the extrapolated plan must agree with it."""
from __future__ import annotations

import pytest

from grpo_megatron.plan.cli import run
from grpo_megatron.plan.simulate import CachedSimulator
from tests.plan.shipped import shipped_jobs

FULL_SIZE = {"gspo_moe.yaml", "grpo_routing_replay.yaml", "gspo_qwen3_235b.yaml"}
AGREEMENT = 1e-3  # extrapolated vs full bytes at full size (measured: within 1 KiB of 35-49 GiB)
LOGPROB_MARGIN = 0.15  # the forward-only log-prob peak is not linear in the layers (test_layers_extrapolate.py)


@pytest.fixture(scope="module")
def extrapolating():
    return CachedSimulator(extrapolate_layers=True)


@pytest.fixture(scope="module")
def full():
    return CachedSimulator()


def check_fits(job, simulate):
    status, plan, _ = run(job.argv() + ["--no-fix"], simulate=simulate)
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
    return plan


@pytest.mark.parametrize("job", shipped_jobs(), ids=lambda job: job.config.name)
def test_shipped_config_fits_at_its_default_allocation(job, extrapolating):
    plan = check_fits(job, extrapolating)
    # more than 2 layers per stage in every shipped model: the plan extrapolated, it did not fall back to the full run
    assert all(rank.rank.extra["extrapolated"] for rank in plan.ranks)


@pytest.mark.slow
@pytest.mark.parametrize("job", [j for j in shipped_jobs() if j.config.name in FULL_SIZE],
                         ids=lambda job: job.config.name)
def test_shipped_config_fits_simulated_at_full_size_and_the_extrapolation_agrees(job, full, extrapolating):
    plan = check_fits(job, full)
    _, short, _ = run(job.argv() + ["--no-fix"], simulate=extrapolating)
    for whole, line in zip(plan.ranks, short.ranks, strict=True):
        assert not whole.rank.extra["extrapolated"] and line.rank.extra["extrapolated"]
        for name in ("static_bytes", "peak_bytes", "param_bytes", "grad_bytes", "optimizer_bytes"):
            assert getattr(line.rank, name) == pytest.approx(getattr(whole.rank, name), rel=AGREEMENT), name
        assert line.rank.logprob_peak_bytes == pytest.approx(whole.rank.logprob_peak_bytes, rel=LOGPROB_MARGIN)
