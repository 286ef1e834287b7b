"""slurm/gspo_moe.sh submitted to a real local Slurm in CPU mode with the tiny MoE example.

One node, two simulated nodes (ranks from both node names in the log), pre-emption + requeue + resume,
and the early failures (missing config/checkpoint, a layout that does not fit, SGLang not installed). The jobs that
train run whole and are in the e2e tier (CI's `pytest -m "e2e and not slow"`); the cluster and the early failures
run in the default suite.
"""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import time

import pytest

from tests.slurm.cluster import LocalSlurm, pid_alive
from tests.slurm.conftest import (checkpoint_steps, job_env, job_info, job_log, metrics_steps, needs_slurm,
                                  submit, wait_job)

pytestmark = [needs_slurm, pytest.mark.usefixtures("no_stray_env")]


def test_cluster_start_stop_by_saved_pids(tmp_path):
    cluster = LocalSlurm(tmp_path / "c", nodes=2).start()
    pids = json.loads(cluster.pids_file.read_text())
    assert set(pids) == {"munged", "slurmctld", "slurmd-n1", "slurmd-n2"}
    assert all(pid_alive(p) for p in pids.values())
    out = subprocess.run(["srun", "-N2", "--ntasks-per-node=1", "bash", "-c", "echo $SLURMD_NODENAME"],
                         env=cluster.env, capture_output=True, text=True, timeout=60)
    assert sorted(out.stdout.split()) == ["n1", "n2"], out.stderr
    cluster.stop()
    assert not any(pid_alive(p) for p in pids.values())
    assert not cluster.pids_file.exists()


@pytest.mark.slow  # the requeue test runs a one-node job to completion too
def test_one_node_completes(cluster1, tiny_example, tmp_path):
    run_dir = tmp_path / "run"
    env = job_env(cluster1, tiny_example, run_dir)
    start = time.monotonic()
    job = submit(env, tmp_path, "--train-iters", "3")
    info = wait_job(env, job, tmp_path)
    log = job_log(tmp_path, job)
    print(f"one-node job {job}: {time.monotonic() - start:.1f}s from submit, RunTime={info.get('RunTime')}")
    assert info["JobState"] == "COMPLETED", log
    assert metrics_steps(run_dir)[-3:] == [1, 2, 3], log
    assert checkpoint_steps(run_dir)[-1] == 3, log
    assert (run_dir / "checkpoints" / "step_000003").is_dir()
    assert "done: step 3 of 3" in log


@pytest.mark.e2e  # a whole job of the tiny example, as `sbatch` runs it: CI's e2e step
def test_two_nodes_both_take_part(cluster2, tiny_example, tmp_path):
    run_dir = tmp_path / "run"
    env = job_env(cluster2, tiny_example, run_dir)
    start = time.monotonic()
    job = submit(env, tmp_path, "--train-iters", "2", "--expert-model-parallel-size", "2", nodes=2)
    info = wait_job(env, job, tmp_path)
    log = job_log(tmp_path, job)
    print(f"two-node job {job}: {time.monotonic() - start:.1f}s from submit, RunTime={info.get('RunTime')}")
    assert info["JobState"] == "COMPLETED", log
    assert "worker rank 0 of 2 (local rank 0) on node n1" in log, log
    assert "worker rank 1 of 2 (local rank 0) on node n2" in log, log
    assert "layout tp=1 pp=1 ep=2 cp=1 dp=2" in log
    assert metrics_steps(run_dir)[-2:] == [1, 2], log
    assert checkpoint_steps(run_dir)[-1] == 2, log


@pytest.mark.e2e
def test_preempted_job_requeues_and_resumes(cluster1, tiny_example, tmp_path):
    run_dir = tmp_path / "run"
    env = job_env(cluster1, tiny_example, run_dir)
    start = time.monotonic()
    job = submit(env, tmp_path, "--train-iters", "4")
    # Wait for the first RL step, then send what `#SBATCH --signal=B:USR1@300` sends before the limit.
    deadline = time.monotonic() + 180
    while 1 not in metrics_steps(run_dir):
        assert time.monotonic() < deadline, job_log(tmp_path, job)
        assert job_info(env, job).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), job_log(tmp_path, job)
        time.sleep(0.5)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=env, check=True)
    info = wait_job(env, job, tmp_path, timeout=300)
    log = job_log(tmp_path, job)
    print(f"requeue job {job}: {time.monotonic() - start:.1f}s from submit to the end of the second run")
    assert info["JobState"] == "COMPLETED", log
    assert info["Restarts"] == "1", log
    assert "PREEMPTED: checkpoint saved at" in log
    saved = int(re.search(r"checkpoint at step (\d+) of 4; requeueing", log).group(1))
    assert 1 <= saved < 4, log
    assert f"resumed from {run_dir}/checkpoints/step_{saved:06d} at step {saved}" in log, log
    assert "job %s (restart 1)" % job in log
    steps = metrics_steps(run_dir)
    # Each step logged once: the second run continues after the checkpoint instead of starting over.
    rl_steps = [s for s in steps if s > 0]
    assert rl_steps == list(range(1, 5)), steps
    assert checkpoint_steps(run_dir)[-1] == 4


def test_early_failures_stop_the_job_with_a_message(cluster1, tiny_example, tmp_path):
    """Each broken submission fails within seconds, before any trainer starts, saying what to fix."""
    cases = {
        "no_config": ({"CONFIG": str(tmp_path / "missing.yaml")}, [], r"config file .*missing\.yaml does not exist"),
        "no_checkpoint": ({"MCORE_PATH": str(tmp_path / "no_mcore")}, [],
                          r"model\.megatron_path=.*no_mcore does not exist"),
        "layout": ({}, ["--tensor-model-parallel-size", "2"],
                   r"parallel layout does not fit the allocation \(1 trainer node\(s\) x 1 process\(es\) = 1\)"),
    }
    if importlib.util.find_spec("sglang") is None:
        cases["no_sglang"] = ({}, ["--rollout.engine", "sglang"], r"SGLang is not importable by .* on the rollout nodes")
    jobs = {}
    for name, (extra, args, _) in cases.items():
        env = job_env(cluster1, tiny_example, tmp_path / name, **extra)
        jobs[name] = (env, submit(env, tmp_path, *args))
    for name, (env, job) in jobs.items():
        info = wait_job(env, job, tmp_path, timeout=120)
        log = job_log(tmp_path, job)
        assert info["JobState"] == "FAILED", (name, log)
        assert re.search(cases[name][2], log), (name, log)
        assert "worker rank" not in log, (name, log)
