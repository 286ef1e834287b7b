"""The trainer's GPU code paths under CUDA's rules on this CPU machine (see harness.py and scenarios.py).

One fresh interpreter runs every layout (the suite's other tests apply the CPU shims in this process,
which would hide device mismatches); each check is reported here as its own test.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.gpu_semantics.scenarios import LAYOUTS, LOSSES

pytestmark = pytest.mark.gpu_semantics

CHECKS = ["build", "logprob_gather", *[f"loss_{v}" for v in LOSSES], "metric_reduction", "weight_sync_buckets",
          "stop_flag", "phase_timer"]
MOE_CHECKS = ["route_delivery", "routing_replay_r3", "routing_replay_r2"]


@pytest.fixture(scope="module")
def results() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "tests.gpu_semantics.scenarios"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    line = next((l for l in run.stdout.splitlines() if l.startswith("RESULTS ")), None)
    assert line, f"scenarios crashed (rc {run.returncode}):\n{run.stderr[-4000:]}"
    return json.loads(line[len("RESULTS "):])


# Checks fake mode cannot follow yet (each fails in megatron, not in the project): under PP2 the pipeline's
# receive buffers come from a fake group that moves no data, and the next stage's norm sees a [1, 1, 1]
# placeholder; under EP2 megatron's all-to-all takes its split sizes from `.numpy()`, which fake tensors
# refuse (and at EP1 its token permutation's `masked_select` has a data-dependent shape, which fake mode
# refuses too: no MoE forward runs here). Model building at both layouts, the stop flag, the timer and the
# delivery of the engine's routes (rank 1's share over the gloo control group) are checked.
NOT_FOLLOWED = {f"{layout}/{c}" for layout in ("pp2", "ep2")
                for c in ["logprob_gather", *[f"loss_{v}" for v in LOSSES], "metric_reduction", *MOE_CHECKS[1:]]} | {
    # the bucket stream first all-gathers every rank's pipeline stage as objects, which a fake group only echoes
    "pp2/weight_sync_buckets"}


@pytest.mark.parametrize("check", [f"{name}/{c}" for name, (_, family, _) in LAYOUTS.items()
                                   for c in CHECKS + (MOE_CHECKS if family == "qwen3_moe" else [])])
def test_check(results, check):
    if check in NOT_FOLLOWED:
        pytest.xfail("fake mode cannot follow megatron here (see NOT_FOLLOWED)")
    assert results.get(check) == "ok", results.get(check, "not run")
