"""The README's CPU example, shortened to a few steps: one process, and two gloo processes with EP=2."""
import json

import pytest

from tests.conftest import run_cli


def run_example(tmp_path, *extra):
    cache = tmp_path.parent / "example_cache"  # shared by both tests of a session
    result = run_cli(["examples/tiny_cpu/run.py", "--quick", "--cache", str(cache),
                      "--run-dir", str(tmp_path / "run"), *extra], timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return result, records


def test_quick_example_runs_end_to_end(tmp_path):
    result, records = run_example(tmp_path)
    assert [r["step"] for r in records if "time/step" in r] == [1, 2, 3, 4]
    assert "held-out accuracy (greedy): before RL" in result.stdout
    assert (tmp_path / "run" / "checkpoints" / "step_000004" / "trainer_state.json").exists()
    assert (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.distributed
def test_quick_example_with_two_processes_and_expert_parallelism(tmp_path):
    _, records = run_example(tmp_path, "--nproc", "2", "--ep", "2")
    steps = [r for r in records if "time/step" in r]
    assert len(steps) == 4
    assert all(r["train_rollout/logprob_abs_diff"] < 1e-4 for r in steps)
