"""SIGKILL at a random moment, in each rollout mode, then resume: every prompt draw is trained exactly once.

The run checkpoints every step; the kill lands anywhere after the first step (in training, generation,
a weight push or a save). prompts.jsonl (truncated to the checkpoint on resume) then lists the draws
trained at each step; with nothing dropped by config (no dynamic sampling, stale groups regenerated) they
must be 0 .. steps * prompts_per_step - 1, each once. sync and one_step_off are deterministic, so their
log must also equal an uninterrupted run's.
"""
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from grpo_megatron.config import replace_keys, save_config
from grpo_megatron.training.prompt_log import read_prompt_log
from tests.conftest import REPO

STEPS, PROMPTS = 5, 4
RUN = textwrap.dedent("""
    import sys
    from grpo_megatron.config import load_config
    from grpo_megatron.training.loop import Trainer

    if __name__ == "__main__":  # dist_checkpointing starts a multiprocessing manager (spawn)
        trainer = Trainer(load_config(sys.argv[1]))
        trainer.train()
        trainer.close()
""")


def launch(tmp_path, config_path):
    script = tmp_path / "run.py"
    script.write_text(RUN)
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    log = (tmp_path / "log.txt").open("a")
    return subprocess.Popen([sys.executable, str(script), str(config_path)], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def trained_steps(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] > 0)


@pytest.mark.slow  # 2-3 runs of a trainer process per mode, ~2-6 min each on 2 shared cores
@pytest.mark.parametrize("mode", ["sync", "one_step_off", "async", "async+partial"])
def test_sigkill_and_resume_train_every_draw_exactly_once(mode, make_config, tmp_path):
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    partial = mode == "async+partial"  # pushes land mid-generation: a kill can cut a multi-version sample
    mode = "async" if partial else mode
    overrides = dict(train={"steps": STEPS, "num_minibatches": 1}, checkpoint={"save_interval": 1, "keep_last": 2},
                     rollout={"prompts_per_step": PROMPTS, "mode": mode, "max_staleness": 2,
                              "partial_rollouts": partial},
                     reward={"functions": [{"name": "tests.training.test_loop:varied_reward"}]},
                     algorithm={"rollout_correction": {"mode": "tis"}}, eval={"num_prompts": 2})
    cfg = make_config(run_dir=str(tmp_path / "run"), **overrides)
    save_config(cfg, tmp_path / "run.yaml")
    proc = launch(tmp_path, tmp_path / "run.yaml")
    deadline = time.time() + 300
    while trained_steps(tmp_path / "run") < 1 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(rng.uniform(0.0, 4.0))  # anywhere in the following steps
    killed_after = trained_steps(tmp_path / "run")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert killed_after < STEPS, f"the run ended before the kill (seed {seed}); the test needs a later kill"

    save_config(replace_keys(cfg, {"checkpoint.resume": True}), tmp_path / "resume.yaml")
    resumed = launch(tmp_path, tmp_path / "resume.yaml")
    assert resumed.wait(timeout=600) == 0, (tmp_path / "log.txt").read_text()[-3000:]

    log = read_prompt_log(tmp_path / "run")
    assert [line["step"] for line in log] == list(range(1, STEPS + 1)), (seed, log)
    draws = [d for line in log for d in line["draws"]]
    assert sorted(draws) == list(range(STEPS * PROMPTS)), (seed, killed_after, log)
    if mode != "async":
        straight = make_config(run_dir=str(tmp_path / "straight"), **overrides)
        save_config(straight, tmp_path / "straight.yaml")
        assert launch(tmp_path, tmp_path / "straight.yaml").wait(timeout=600) == 0
        assert read_prompt_log(tmp_path / "straight") == log, (seed, killed_after)
