"""Fixtures for the Slurm tests: local clusters (1 and 2 simulated nodes), the tiny CPU example, sbatch helpers.

The tests submit the real slurm/*.sh scripts to a real Slurm (tests/slurm/cluster.py). They are skipped,
naming what is missing, only when the Slurm/munge binaries are absent: `bash scripts/install_slurm.sh`.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.slurm.cluster import LocalSlurm, missing_binaries

REPO = Path(__file__).resolve().parents[2]
MISSING = missing_binaries()
needs_slurm = pytest.mark.skipif(
    bool(MISSING), reason=f"Slurm binaries not installed ({', '.join(MISSING)}): run scripts/install_slurm.sh")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


@pytest.fixture(scope="module")
def cluster1(tmp_path_factory):
    """A single-host cluster with one node, stopped by its saved PIDs after the module."""
    with LocalSlurm(tmp_path_factory.mktemp("slurm1"), nodes=1) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def cluster2(tmp_path_factory):
    """Two simulated nodes (n1, n2) on this host."""
    with LocalSlurm(tmp_path_factory.mktemp("slurm2"), nodes=2) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def tiny_example(tmp_path_factory):
    """examples/tiny_cpu/prepare.py's outputs (HF + megatron checkpoints, copy-task data), made once."""
    sys.path.insert(0, str(REPO / "examples" / "tiny_cpu"))
    try:
        from prepare import prepare
    finally:
        sys.path.pop(0)
    return prepare(tmp_path_factory.mktemp("tiny_cpu_cache"), "copy")


def job_env(cluster: LocalSlurm, tiny: dict, run_dir: Path, **extra: str) -> dict:
    """Environment for `sbatch` of slurm/gspo_moe.sh in CPU mode on the tiny example."""
    env = cluster.env
    for key in ("SLURM_JOB_ID", "SLURM_JOBID", "MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    env.update(
        CONFIG=str(REPO / "slurm" / "configs" / "tiny_cpu.yaml"),
        HF_PATH=str(tiny["hf"]), MCORE_PATH=str(tiny["mcore"]), RUN_DIR=str(run_dir),
        TRAIN_ARGS=f"--data.train_files {tiny['train']} --data.eval_files {tiny['eval']}",
        PYTHON=sys.executable, PYTHONWARNINGS="ignore",
    )
    env.update(extra)
    return env


def submit(env: dict, log_dir: Path, *args: str, script: str = "slurm/gspo_moe.sh", nodes: int = 1) -> str:
    """sbatch the script in CPU mode (no GPUs, small CPU request); returns the job id."""
    cmd = ["sbatch", "--parsable", f"--nodes={nodes}", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=0",
           f"--output={log_dir}/%x-%j.out", script, *args]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().split(";")[0]


def job_info(env: dict, job_id: str) -> dict:
    """`scontrol show job` as a dict (no accounting here, so no sacct)."""
    out = subprocess.run(["scontrol", "show", "job", job_id, "-o"], env=env, capture_output=True, text=True)
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def job_log(log_dir: Path, job_id: str) -> str:
    logs = list(log_dir.glob(f"*-{job_id}.out"))
    return logs[0].read_text(errors="replace") if logs else "(no job output file)"


def wait_job(env: dict, job_id: str, log_dir: Path, timeout: float = 240.0) -> dict:
    """Poll until the job reaches a final state; on timeout cancel it and fail with its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(env, job_id)
        if info.get("JobState") in FINAL_STATES:
            return info
        time.sleep(1)
    subprocess.run(["scancel", job_id], env=env)
    pytest.fail(f"job {job_id} not finished after {timeout:.0f}s: {job_info(env, job_id)}\n{job_log(log_dir, job_id)}")


def metrics_steps(run_dir: Path) -> list[int]:
    import json

    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def checkpoint_steps(run_dir: Path) -> list[int]:
    root = run_dir / "checkpoints"
    return sorted(int(p.name.split("_")[1]) for p in root.glob("step_*")) if root.exists() else []


@pytest.fixture
def no_stray_env(monkeypatch):
    """Inside an allocation (a developer's salloc) SLURM_* variables would leak into the test jobs."""
    for key in list(os.environ):
        if key.startswith("SLURM_") and key != "SLURM_CONF":
            monkeypatch.delenv(key)
