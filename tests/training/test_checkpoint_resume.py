"""Checkpoints: resuming reproduces an uninterrupted run; a crash mid-save keeps the previous one."""
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

from grpo_megatron.config import replace_keys
from grpo_megatron.training.checkpoint import latest_checkpoint, list_checkpoints
from grpo_megatron.training.loop import Trainer
from grpo_megatron.training.metrics import read_metrics
from tests.conftest import REPO

def comparable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith(("time/", "throughput/"))}


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert math.isclose(a[key], b[key], rel_tol=1e-6, abs_tol=1e-7), (key, a[key], b[key])


@pytest.mark.parametrize("schedule", [{"lr_warmup_steps": 3, "lr_decay_style": "cosine", "min_lr": 1e-4},
                                      {"lr_warmup_steps": 0, "lr_decay_style": "linear", "min_lr": 0.0}])
def test_resume_reproduces_the_uninterrupted_run(schedule, make_config, tmp_path, dist_world1):
    """Warm-up and decay are mid-way at the resume point: a scheduler that restarted would change `train/lr`."""
    def config(run):
        return make_config(run_dir=str(tmp_path / run), train={"steps": 4, "lr": 3e-3, **schedule},
                           checkpoint={"save_interval": 2, "keep_last": 3},
                           reward={"functions": [{"name": "tests.training.test_loop:varied_reward"}]})

    straight = Trainer(config("straight"))
    history = straight.train()
    straight.close()

    first = Trainer(config("resumed"))
    first.train_step()
    first.train_step()
    first.save_checkpoint()
    first.close()
    second = Trainer(replace_keys(config("resumed"), {"checkpoint.resume": True}))
    assert second.step == 2
    resumed = second.train()
    second.close()

    lrs = [m["train/lr"] for m in history]
    assert len(set(lrs)) == len(lrs), lrs  # the schedule moves at every step, across the resume point too
    for expected, got in zip(history[2:], resumed):
        assert_same(comparable(expected), comparable(got))
    assert [m["step"] for m in read_metrics(tmp_path / "resumed") if "reward/mean" in m] == [3, 4]
    assert [step for step, _ in list_checkpoints(tmp_path / "resumed")] == [2, 4]


def test_retention_keeps_the_last_k(make_config, tmp_path, dist_world1):
    trainer = Trainer(make_config(train={"steps": 3}, checkpoint={"save_interval": 1, "keep_last": 2}))
    trainer.train()
    trainer.close()
    assert [step for step, _ in list_checkpoints(trainer.run_dir)] == [2, 3]


CRASHING_RUN = textwrap.dedent("""
    import os, signal, sys
    from megatron.core import dist_checkpointing
    from grpo_megatron.config import load_config
    from grpo_megatron.training.loop import Trainer

    original, calls = dist_checkpointing.save, []

    def save_then_die(*args, **kwargs):
        calls.append(1)
        original(*args, **kwargs)          # the model files of step 2 are written ...
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)   # ... and the process dies before the rename

    if __name__ == "__main__":  # dist_checkpointing starts a multiprocessing manager (spawn)
        dist_checkpointing.save = save_then_die
        Trainer(load_config(sys.argv[1])).train()
""")


def test_crash_during_save_leaves_the_previous_checkpoint(make_config, tmp_path, dist_world1):
    import yaml

    from grpo_megatron.config import save_config

    cfg = make_config(train={"steps": 3}, checkpoint={"save_interval": 1, "keep_last": 1})
    save_config(cfg, tmp_path / "run.yaml")
    script = tmp_path / "crash.py"
    script.write_text(CRASHING_RUN)
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE")}
    log = tmp_path / "crash.log"
    with log.open("w") as out:  # a file, not a pipe: the killed run's helper processes may keep a pipe open
        proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "run.yaml")], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        returncode = proc.wait(timeout=300)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers of the killed run (checkpoint writer processes)
    except ProcessLookupError:
        pass
    assert returncode == -signal.SIGKILL, log.read_text()[-3000:]
    run_dir = tmp_path / "run"
    assert (run_dir / "checkpoints" / ".step_000002.staging").exists()
    assert latest_checkpoint(run_dir).name == "step_000001"

    cfg = yaml.safe_load((tmp_path / "run.yaml").read_text())
    cfg["checkpoint"]["resume"] = True
    resumed = Trainer(make_config(**{k: v for k, v in cfg.items()}))
    assert resumed.step == 1
    metrics = resumed.train_step()
    resumed.close()
    assert math.isfinite(metrics["train/pg_loss"])


def _resume_config(make_config, tmp_path, run):
    return make_config(run_dir=str(tmp_path / run), train={"steps": 4, "lr": 3e-3, "lr_warmup_steps": 3},
                       checkpoint={"save_interval": 2, "keep_last": 3},
                       reward={"functions": [{"name": "tests.training.test_loop:varied_reward"}]})


def _assert_continues(history: list[dict], run_dir) -> None:
    """Steps 3 and 4 of `run_dir` are those of the uninterrupted one-process run (to float rounding: two
    ranks reduce in another order); the samples are identical, so the data cursor and seeds carried over."""
    resumed = [m for m in read_metrics(run_dir) if "reward/mean" in m][-2:]
    assert [m["step"] for m in resumed] == [3, 4]
    for expected, got in zip(history[2:], resumed):
        assert got["reward/mean"] == expected["reward/mean"]
        for key in ("train/lr", "train/grad_norm", "train/pg_loss", "train/entropy", "train/ratio_mean"):
            assert math.isclose(got[key], expected[key], rel_tol=1e-4, abs_tol=1e-6), (key, got[key], expected[key])


def _one_process_checkpoint(make_config, tmp_path) -> list[str]:
    """A checkpoint of two steps by one process; the command line that resumes it."""
    from grpo_megatron.config import save_config

    first = Trainer(_resume_config(make_config, tmp_path, "resumed"))
    first.train_step()
    first.train_step()
    first.save_checkpoint()
    first.close()
    save_config(_resume_config(make_config, tmp_path, "resumed"), tmp_path / "resumed.yaml")
    return ["-m", "grpo_megatron.train", "--config", str(tmp_path / "resumed.yaml"), "--resume"]


@pytest.mark.distributed
def test_resume_on_another_parallel_layout(make_config, tmp_path, dist_world1):
    """A one-process checkpoint resumed by two data-parallel processes continues as the uninterrupted run
    (megatron's dist_checkpointing reshards model and optimizer state). TP/PP changes take megatron's
    resharding path too and are not run here."""
    from tests.conftest import run_cli

    straight = Trainer(_resume_config(make_config, tmp_path, "straight"))
    history = straight.train()
    straight.close()
    result = run_cli(_one_process_checkpoint(make_config, tmp_path), nproc=2, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    _assert_continues(history, tmp_path / "resumed")


@pytest.mark.distributed
@pytest.mark.slow  # two 2-process torchrun starts; the resume that works is in the default suite
def test_resume_where_the_optimizer_state_is_keyed_differently_is_refused(make_config, tmp_path, dist_world1):
    """Where megatron keys the optimizer state differently (expert parallelism chains separate dense and expert
    optimizers; the distributed optimizer keeps main parameters), the resume is refused with one line naming
    the ways out."""
    from tests.conftest import run_cli

    train = _one_process_checkpoint(make_config, tmp_path)
    for refused_layout in (["--expert-model-parallel-size", "2"], ["--train.distributed_optimizer", "true"]):
        refused = run_cli([*train, *refused_layout], nproc=2, timeout=600)
        assert refused.returncode != 0, refused.stderr[-3000:]  # torchrun turns the trainer's status 2 into 1
        assert "holds optimizer state this run cannot use" in refused.stderr, refused.stderr[-3000:]
        assert "model.megatron_path" in refused.stderr


@pytest.mark.distributed
@pytest.mark.slow  # 2-process torchrun twice; the bug it found has a one-process test: test_distributed_optimizer_state.py
def test_distributed_optimizer_checkpoint_resumes(make_config, tmp_path, dist_world1):
    """Two processes with megatron's distributed optimizer (the GPU default at DP > 1): a run resumed from its
    step-2 checkpoint repeats steps 3 and 4 of the uninterrupted run."""
    from grpo_megatron.config import save_config
    from tests.conftest import run_cli

    save_config(_resume_config(make_config, tmp_path, "run"), tmp_path / "run.yaml")
    train = ["-m", "grpo_megatron.train", "--config", str(tmp_path / "run.yaml"), "--train.distributed_optimizer", "true"]
    first = run_cli(train, nproc=2, timeout=600)  # checkpoints at steps 2 and 4
    assert first.returncode == 0, first.stderr[-5000:]
    uninterrupted = [m for m in read_metrics(tmp_path / "run") if "reward/mean" in m]
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_000004")  # as if it had stopped after step 2
    second = run_cli([*train, "--resume"], nproc=2, timeout=600)
    assert second.returncode == 0, second.stderr[-5000:]
    resumed = [m for m in read_metrics(tmp_path / "run") if "reward/mean" in m][-2:]
    assert [m["step"] for m in resumed] == [3, 4]
    for expected, got in zip(uninterrupted[2:], resumed):
        assert_same(comparable(expected), comparable(got))
