"""Rollout modes one_step_off and async: versions and staleness of what is trained, reproducibility of
one_step_off, dynamic sampling and overlong shaping off the main thread, config errors."""
import json
import math

import pytest

from grpo_megatron.config import ConfigError
from grpo_megatron.training.loop import Trainer
from grpo_megatron.training.prompt_log import read_prompt_log
from tests.training.test_loop import VARIED

TIS = {"rollout_correction": {"mode": "tis"}}


def run(make_config, steps: int, trained_versions: list | None = None, **overrides):
    trainer = Trainer(make_config(train={"steps": steps}, **{"reward": VARIED, **overrides}))
    if trained_versions is not None:
        update = trainer.learner.update

        def recording(samples, step, timer=None, routes=None):
            trained_versions.append((step, sorted({v for s in samples for v in s.weight_versions})))
            return update(samples, step, timer, routes)

        trainer.learner.update = recording
    history = trainer.train()
    trainer.close()
    return history


def test_one_step_off_trains_batch_t_generated_with_weights_t_minus_1(make_config, dist_world1):
    versions = []
    history = run(make_config, 3, versions, rollout={"mode": "one_step_off"}, algorithm=TIS)
    assert versions == [(0, [0]), (1, [0]), (2, [1])]
    assert [m["async/staleness_max"] for m in history] == [0.0, 1.0, 1.0]
    for m in history:
        assert m["time/trainer_idle"] >= 0 and m["time/rollout_idle"] >= 0 and m["async/buffer_groups"] >= 0
        assert m["time/rollout_busy"] >= 0
    assert sum(m["time/rollout_busy"] for m in history) > 0  # the three batches' generation, however it split


def test_one_step_off_is_reproducible(make_config, tmp_path, dist_world1):
    """Every batch has exactly one weight version whatever the threads' timing, so two runs agree."""
    runs = [run(make_config, 3, run_dir=str(tmp_path / name), rollout={"mode": "one_step_off"}, algorithm=TIS)
            for name in ("a", "b")]
    for a, b in zip(*runs):
        for key in a:
            if not key.startswith(("time/", "throughput/", "async/buffer")):
                assert math.isclose(a[key], b[key], rel_tol=1e-6, abs_tol=1e-7), key
    assert read_prompt_log(tmp_path / "a") == read_prompt_log(tmp_path / "b")


@pytest.mark.parametrize("max_staleness", [1, 2])
def test_async_keeps_every_trained_token_within_max_staleness(max_staleness, make_config, tmp_path, dist_world1):
    versions = []
    history = run(make_config, 4, versions, rollout={"mode": "async", "max_staleness": max_staleness},
                  algorithm=TIS)
    for step, seen in versions:
        assert step - min(seen) <= max_staleness, (step, seen)
    assert max(m["async/staleness_max"] for m in history) <= max_staleness
    draws = [d for line in read_prompt_log(tmp_path / "run") for d in line["draws"]]
    assert sorted(draws) == list(range(4 * 4))  # each draw trained once, in a run that drops nothing


def test_dynamic_sampling_and_overlong_shaping_in_async(make_config, dist_world1):
    """(The overlong filter would mask every sample of this 3-token budget out of the loss.)"""
    history = run(make_config, 2, rollout={"mode": "async", "dynamic_sampling": True, "max_sampling_rounds": 3},
                  algorithm=TIS, reward={**VARIED, "overlong_penalty": True, "overlong_cache_tokens": 2})
    assert all(m["rollout/prompts_drawn"] >= 4 for m in history)
    assert all(math.isfinite(m["train/pg_loss"]) for m in history)


@pytest.mark.parametrize("rollout, algorithm, message", [
    ({"mode": "later"}, {}, "rollout.mode='later'"),
    ({"mode": "async"}, {}, "rollout_correction.mode"),
    ({"mode": "async", "max_staleness": 0}, TIS, "max_staleness=0"),
    ({"mode": "async", "stale_groups": "keep"}, TIS, "stale_groups='keep'"),
    ({"mode": "one_step_off", "partial_rollouts": True}, TIS, "partial_rollouts needs rollout.mode async"),
])
def test_config_errors(rollout, algorithm, message, make_config):
    with pytest.raises(ConfigError, match=message):
        make_config(rollout=rollout, algorithm=algorithm)


@pytest.mark.e2e  # the example's whole run (minutes); the async loop's own checks are the tests above
def test_cpu_example_runs_asynchronously(tmp_path):
    """The README's CPU example, quick, with the embedded engine generating on its rollout thread."""
    from tests.conftest import run_cli

    result = run_cli(["examples/tiny_cpu/run.py", "--quick", "--cache", str(tmp_path / "cache"), "--run-dir",
                      str(tmp_path / "run"), "--rollout.mode", "async", "--algorithm.rollout_correction.mode", "tis"],
                     timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "time/step" in r]
    assert len(steps) == 4 and all(r["async/staleness_max"] <= 1 for r in steps)
