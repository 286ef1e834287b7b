"""TP=2 with sequence parallelism, EP=2 (with DP=2) and PP=2 on 2 gloo processes replay exactly like 1."""
import json

import pytest

from grpo_megatron.parallel import ParallelLayout
from tests.conftest import run_cli
from tests.replay.helpers import replay_run


@pytest.mark.distributed
def test_sharded_replay_gives_the_single_process_losses_and_agreement(tiny_hf_dir, dist_world1):
    hf_dir = tiny_hf_dir("qwen3_moe")
    result = run_cli(["tests/replay/dist_replay.py", "--hf-path", str(hf_dir), "--layouts", "tp2,ep2,pp2",
                      "--modes", "r2,r3"], nproc=2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    runs = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert {(r["layout"], r["mode"]) for r in runs} == {(lay, m) for lay in ("tp2", "ep2", "pp2") for m in ("r2", "r3")}
    reference = {mode: replay_run(hf_dir, ParallelLayout(), mode) for mode in ("r2", "r3", "none")}
    # Replay changes the loss (the routers were perturbed), by far more than the sharding tolerance.
    assert abs(reference["r2"]["nll"] - reference["none"]["nll"]) > 1e-4
    assert abs(reference["r3"]["nll"] - reference["none"]["nll"]) > 1e-4
    for run in runs:
        expected = reference[run["mode"]]
        assert run["nll"] == pytest.approx(expected["nll"], abs=2e-6), run
        assert set(run) - {"layout", "mode"} == set(expected)
        for key, value in expected.items():
            if key.startswith("routing/"):
                assert run[key] == pytest.approx(value, abs=1e-9), (run["layout"], key)
