"""slurm/preflight.py runs the memory plan on GPU jobs and stops one that does not fit with one line naming the fix,
before anything is started (the tiny MoE model with colocated SGLang servers on 8 GiB GPUs: SGLang's pool at
fraction 0.5 and its runtime leave the GPU short in the generation phase; a smaller pool fits). One real
fake-CUDA simulation of the tiny rank (the one test_shipped_configs plans for tiny_cpu.yaml: one of the two
simulates it, the other finds it in the session's cache)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.multiprocess
def test_preflight_stops_a_job_that_does_not_fit_and_names_the_fix(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("SGLANG_ARGS", "SGLANG_MEM_FRACTION", "SGLANG_TP")}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run(
        [sys.executable, "slurm/preflight.py", "--config", "slurm/configs/tiny_cpu.yaml", "--world-size", "1",
         "--run-dir", str(tmp_path / "run"), "--trainer-nodes", "1", "--gpus-per-node", "1", "--gpu-memory", "8GiB",
         "--plan", "1", "--rollout.engine", "sglang"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1, out.stderr[-3000:]
    assert "does not fit in GPU memory" in errors[0] and "generate phase" in errors[0]
    assert "fix: lower the colocated SGLang pool: SGLANG_MEM_FRACTION=0." in errors[0]
    assert "python -m grpo_megatron.plan --config slurm/configs/tiny_cpu.yaml" in errors[0]
    assert out.stdout == ""  # nothing for common.sh to eval: the job stops
    assert not (tmp_path / "run" / "slurm").exists()  # stopped before the resolved config was written
