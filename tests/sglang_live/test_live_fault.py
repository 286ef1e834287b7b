"""Real rollout-server failures in a training run: two CPU SGLang 0.5.23 servers run by keepers (as the Slurm
scripts run them); one is SIGKILLed mid-generation, later the other is SIGSTOPped (hung) mid-generation. Both are
found within the configured time, restarted, fully synced and probed before they serve again, and the prompt log
shows every draw trained exactly once. Prints the detection and recovery times (benchmarks/README.md).
"""
from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from grpo_megatron.config import load_config
from grpo_megatron.parallel import free_port
from grpo_megatron.rollout.sglang.keeper import read_states
from grpo_megatron.rollout.sglang.launcher import ServerSpec
from grpo_megatron.rollout.sglang.supervisor import State
from grpo_megatron.training.loop import Trainer
from grpo_megatron.training.prompt_log import read_prompt_log
from tests.conftest import REPO
from tests.sglang_live.server import PYTHON, cpu_env

pytestmark = pytest.mark.sglang_live

INTERVAL_S, TIMEOUT_S = 2.0, 10.0  # rollout.sglang.health_interval_s / health_timeout_s of this run
PROMPTS, GROUP = 4, 4


def start_keepers(model: Path, control: Path, count: int) -> tuple[list[str], list[subprocess.Popen]]:
    urls, keepers = [], []
    for i in range(count):
        port = free_port()
        spec = ServerSpec(model_path=str(model), port=port, routed_experts=False, cpu=True, python=str(PYTHON),
                          cpu_kv_tokens=4096, extra_args=["--dtype", "float32"])
        env = [f"--env={k}={v}" for k, v in cpu_env().items()]
        keepers.append(subprocess.Popen(
            [sys.executable, "-m", "grpo_megatron.rollout.sglang.keeper", "--dir", str(control), "--name", f"s{i}",
             "--url", spec.url, "--log", str(control / f"s{i}.log"), *env, "--", *spec.command()],
            cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO))))
        urls.append(spec.url)
    return urls, keepers


def wait_healthy(urls: list[str], timeout_s: float = 900) -> None:
    deadline = time.monotonic() + timeout_s
    for url in urls:
        while True:
            try:
                if httpx.get(url + "/health", timeout=30).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"{url} did not start"
            time.sleep(2)


class Fault:
    """Signals a server's process group once its generation has run `after_s`, and times the supervisor."""

    def __init__(self, trainer: Trainer, url: str, control: Path, sig: signal.Signals, after_s: float = 0.3):
        self.url, self.control, self.sig, self.after_s = url, control, sig, after_s
        self.supervisor = trainer.rollouts.engine.supervisor
        self.started = threading.Event()
        self.at = self.detected = None
        engine = trainer.rollouts.engine
        original = engine.generate

        def generate(*args, **kwargs):
            if not self.started.is_set():
                self.started.set()
                threading.Thread(target=self._fire, daemon=True).start()
            return original(*args, **kwargs)

        engine.generate = generate
        self.restore = lambda: setattr(engine, "generate", original)

    def _fire(self) -> None:
        time.sleep(self.after_s)
        os.killpg(read_states(self.control)[self.url]["pid"], self.sig)
        self.at = time.monotonic()
        while self.supervisor.states[self.url] == State.SERVING:
            time.sleep(0.02)
        self.detected = time.monotonic() - self.at


def step_until(trainer: Trainer, done, steps: list[dict], limit: int) -> None:
    while not done():
        assert len(steps) < limit, f"not recovered after {limit} steps"
        steps.append(trainer.train_step())


def test_killed_and_hung_servers_recover_and_every_draw_trains_once(live_model, tmp_path, dist_world1, caplog):
    from grpo_megatron.rollout.data.tasks import make_task_dataset

    control = tmp_path / "servers"
    control.mkdir()
    urls, keepers = start_keepers(live_model, control, 2)
    trainer = None
    caplog.set_level(logging.INFO, logger="grpo_megatron.rollout.sglang.supervisor")
    try:
        wait_healthy(urls)
        cfg = load_config(None, {
            "run_dir": str(tmp_path / "run"),
            "model": {"hf_path": str(live_model)},
            "data": {"train_files": [str(make_task_dataset("first_digit", 512, 0, tmp_path / "train.jsonl"))]},
            "rollout": {"engine": "sglang", "prompts_per_step": PROMPTS, "group_size": GROUP, "max_new_tokens": 48,
                        "sglang": {"urls": urls, "weight_sync": "tensor", "probe_tolerance": 1e-3,
                                   "restart_dir": str(control), "health_interval_s": INTERVAL_S,
                                   "health_timeout_s": TIMEOUT_S, "timeout_s": 120}},
            "reward": {"functions": [{"name": "tests.training.test_loop:varied_reward"}]},
            "algorithm": {"loss": "gspo"},
            "train": {"steps": 200, "num_minibatches": 1, "micro_batch_size": 16, "lr": 1e-3, "num_threads": 1},
            "logging": {"progress_bar": False, "tensorboard": False},
        })
        trainer = Trainer(cfg)
        supervisor = trainer.rollouts.engine.supervisor
        steps = [trainer.train_step()]

        killed = Fault(trainer, urls[0], control, signal.SIGKILL)
        steps.append(trainer.train_step())
        killed.restore()
        step_until(trainer, lambda: supervisor.states[urls[0]] == State.SERVING, steps, 150)
        steps.append(trainer.train_step())  # one step on both again

        hung = Fault(trainer, urls[1], control, signal.SIGSTOP)
        steps.append(trainer.train_step())
        hung.restore()
        step_until(trainer, lambda: supervisor.states[urls[1]] == State.SERVING, steps, 300)
        steps.append(trainer.train_step())
    finally:
        if trainer is not None:
            trainer.close()
        for keeper in keepers:
            keeper.terminate()
        for keeper in keepers:
            keeper.wait(60)

    messages = [r.getMessage() for r in caplog.records]
    back = {url: [m for m in messages if m.startswith(f"SGLang server {url} serves again")] for url in urls}
    recovery = {url: float(re.search(r", ([0-9.]+) s after it went down", back[url][0]).group(1)) for url in urls}
    print(f"\ndead: out of the pool {killed.detected:.2f} s after SIGKILL, serving again after {recovery[urls[0]]:.1f} s"
          f"\nhung: out of the pool {hung.detected:.2f} s after SIGSTOP, serving again after {recovery[urls[1]]:.1f} s"
          f"\n{len(steps)} steps; per step restarts/reissued/down_s: "
          + str([(s["fault/restarts"], s["fault/reissued_requests"], s["fault/down_s/server0"],
                  s["fault/down_s/server1"]) for s in steps]))
    # Found within the configured time: a dead server at its first failed request, a hung one at a health check.
    assert killed.detected < INTERVAL_S + TIMEOUT_S and hung.detected < INTERVAL_S + TIMEOUT_S + 2
    for url in urls:  # rejoined once each, after the post-sync probe of a full push
        assert len(back[url]) == 1 and "checked by the post-sync probe" in back[url][0]
    assert sum(s["fault/restarts"] for s in steps) == 2
    assert steps[1]["fault/reissued_requests"] >= 1  # the SIGKILL landed mid-generation
    assert all(s["weight_sync/probe_max_abs_diff"] < 1e-3 for s in steps)
    draws = [d for line in read_prompt_log(tmp_path / "run") for d in line["draws"]]
    assert len(draws) == len(set(draws)) == PROMPTS * len(steps)  # every draw trained exactly once
    assert all(s["rollout/prompts_drawn"] == PROMPTS for s in steps)  # no group regenerated or dropped
