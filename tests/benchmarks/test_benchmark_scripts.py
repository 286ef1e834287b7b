"""Smoke tests: the benchmark scripts run end to end with tiny settings (each in its own process; the e2e tier,
tests/tiers.py)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str, timeout: int = 120) -> str:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_train_mfu_prints_a_fraction():
    out = _run("train_mfu.py", "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--expert-width", "64",
               "--layers", "2", "--vocab", "256", "--seq", "32", "--micro-batch", "2", "--micro-batches", "2",
               "--repeats", "1", "--peak-n", "256", "--threads", "1")
    assert "MFU (update / peak" in out and "forward+backward alone" in out


def test_step_vs_trl_prints_the_ratio(tmp_path):
    pytest.importorskip("trl")
    out = _run("step_vs_trl.py", "--steps", "1", "--warmup", "0", "--prompts", "2", "--group", "2",
               "--micro-batch", "4", "--max-new-tokens", "3", "--threads", "1")
    assert "ratio TRL/ours step time" in out and "tokens/s" in out


def test_logprobs_prints_memory_and_alternating_time_ratios():
    out = _run("logprobs.py", "--rows", "256", "--vocab", "512", "--repeats", "2", "--threads", "1")
    lines = [line for line in out.splitlines() if "chunked/naive" in line]
    assert len(lines) == 2 and all("memory" in line and "median of per-pair ratios" in line for line in lines)


def test_moe_experts_prints_both_paths_and_the_pick():
    out = _run("moe_experts.py", "--sizes", "64", "512", "--pairs", "64", "--repeats", "1", "--threads", "1")
    lines = [line for line in out.splitlines() if line.startswith("hidden = expert width")]
    assert len(lines) == 2 and all("grouped/loop" in line for line in lines)
    assert lines[0].endswith("the module uses: grouped") and lines[1].endswith("the module uses: loop")


@pytest.mark.slow
def test_dry_run_prints_the_plan_of_a_shipped_config():
    out = _run("dry_run.py", "--only", "tiny_cpu.yaml", timeout=900)
    assert "### tiny_cpu.yaml" in out and "exit 0" in out and "verdict: FITS" in out


def test_r3_routes_memory_prints_every_phase():
    out = _run("r3_routes_memory.py", "--responses", "2", "--rows", "64", "--layers", "4", "--topk", "2", "--dp", "2")
    assert "decoded (torch.uint8)" in out and "aligned for one 32K micro-batch" in out
