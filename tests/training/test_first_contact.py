"""What a newcomer meets first: a user error is one `error:` line and exit status 2 (no traceback), the
known fallback notices of a CPU start are not printed (other warnings are), and a broken reward function
is counted and logged once per batch, then stops the run after `reward.max_failed_steps` failed steps."""
from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from grpo_megatron.config import EvalConfig, RewardConfig, RewardFunctionConfig, RolloutConfig
from grpo_megatron.train import KNOWN_HARMLESS_WARNINGS, quiet_known_warnings
from grpo_megatron.training.loop import Trainer
from grpo_megatron.training.rollout_side import RolloutSide
from grpo_megatron.rollout.rewards.runner import RewardRunner, RewardsFailedError

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / "examples" / "tiny_cpu" / "cache"
EXAMPLE = ["--config", str(REPO / "examples" / "tiny_cpu" / "gspo_moe.yaml"),
           "--model.hf_path", str(CACHE / "tiny_qwen3_moe_hf"), "--model.megatron_path", str(CACHE / "tiny_qwen3_moe_mcore"),
           "--data.train_files", str(CACHE / "copy_train.jsonl"), "--data.eval_files", str(CACHE / "copy_eval.jsonl")]


def train(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "grpo_megatron.train", *args, "--run_dir", str(tmp_path / "run")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


@pytest.mark.parametrize("args, message", [
    (["--config", "missing.yaml"], "error: config file missing.yaml does not exist"),
    ([*EXAMPLE, "--train.no_such_key", "1"], "error: unknown config key(s) train.no_such_key; known keys in train:"),
])
def test_a_config_error_is_one_line_and_status_2(args, message, tmp_path, monkeypatch, capsys):
    """In-process (the entry point's main, no model built); the real command line is in the subprocess tests."""
    from grpo_megatron import parallel, process_setup, train as train_cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(process_setup, "prepare_process", lambda cfg: None)  # no signal handlers in pytest
    monkeypatch.setattr(parallel, "destroy", lambda: None)  # the suite's one-process gloo world stays up
    monkeypatch.setattr(Trainer, "__init__", lambda self, cfg, parts=None: pytest.fail("the error came after the model build"))
    status = train_cli.main([*args, "--run_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith(message), lines


@pytest.mark.multiprocess  # the real command line, in its own interpreter (a missing checkpoint: test_preflight)
def test_a_layout_error_after_start_up_prints_no_fallback_notices(tmp_path):
    result = train(*EXAMPLE, "--tensor-model-parallel-size", "2", tmp_path=tmp_path)
    lines = error_lines(result)
    assert len(lines) == 1 and "tensor" in lines[0].lower(), result.stderr[-3000:]
    assert "Warning" not in result.stderr, result.stderr[-3000:]


def test_only_the_known_warnings_are_hidden():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_warnings()
        for category, message in KNOWN_HARMLESS_WARNINGS:
            warnings.warn(message, category)
        warnings.warn("Apex is not installed. Falling back to Torch Norm, and something else", UserWarning)
        warnings.warn("a real problem", UserWarning)
    assert [str(w.message) for w in caught] == [
        "Apex is not installed. Falling back to Torch Norm, and something else", "a real problem"]


def _fails_on_x(text, answer, meta):
    if text == "x":
        raise RuntimeError("cannot parse")
    return 1.0


def runner(max_failed_steps: int = 3) -> RewardRunner:
    return RewardRunner(RewardConfig(functions=[RewardFunctionConfig(name=f"{__name__}:_fails_on_x")],
                                     fallback=-1.0, max_failed_steps=max_failed_steps))


def test_failures_are_counted_and_logged_once_per_batch(caplog):
    rewards = runner()
    with caplog.at_level(logging.WARNING):
        assert rewards.score(["p"] * 4, ["x", "1", "x", "x"], [None] * 4, [{}] * 4) == [-1.0, 1.0, -1.0, -1.0]
    assert (rewards.last_failed, rewards.last_calls) == (3, 4)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1
    assert warned[0].startswith("3 of 4 reward calls failed and scored -1.0; the first: reward ")
    assert "raised RuntimeError: cannot parse on response 'x'" in warned[0]


def test_consecutive_all_failed_steps_stop_the_run():
    rewards = runner(max_failed_steps=2)
    rewards.end_step(4, 4)
    rewards.end_step(3, 4)  # one call succeeded: the count starts over
    rewards.end_step(4, 4)
    with pytest.raises(RewardsFailedError, match=r"every reward call failed in the last 2 steps.*max_failed_steps"):
        rewards.end_step(4, 4)
    never = runner(max_failed_steps=0)
    for _ in range(5):
        never.end_step(4, 4)


def test_rollout_reports_the_error_fraction():
    """The rollout side on stand-ins for the engine and data: reward/error_frac and the stop reach the step."""
    from grpo_megatron.samples import Sample
    from grpo_megatron.training.rollout_worker import RolloutSpec, RolloutWorker

    texts = iter([["x", "1", "x", "1"], ["x"] * 4, ["x"] * 4])
    spec = RolloutSpec(rollout=RolloutConfig(prompts_per_step=2, group_size=2),
                       reward=RewardConfig(overlong_penalty=False), eval=EvalConfig(), seed=0, steps=3,
                       engine_routes=False, hf_path="")
    fake = SimpleNamespace(spec=spec, rewards=runner(max_failed_steps=2),
                           tokenizer=SimpleNamespace(batch_decode=lambda ids, skip_special_tokens: list(ids)))
    loader = SimpleNamespace(next_items=lambda count: [{"index": 0}] * count, drawn=0)
    worker = RolloutWorker(
        spec, loader, lambda items, params, first_group: [Sample("p", t, group=0) for t in next(texts)],
        lambda samples: RolloutSide.score(fake, samples), lambda seed_offset: None, fake.rewards.end_step, lambda: 0)
    assert worker.rollout_now(0)[1]["reward/error_frac"] == 0.5
    assert worker.rollout_now(1)[1]["reward/error_frac"] == 1.0
    with pytest.raises(RewardsFailedError):
        worker.rollout_now(2)
