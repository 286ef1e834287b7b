"""Rollout servers that die or hang, against mock SGLang servers run by keepers (rollout/sglang/keeper.py): the
health verdicts, re-issue of in-flight requests, restarts, the full sync + probe before a restarted server serves,
the restart bound. The real servers' SIGKILL/SIGSTOP run is tests/sglang_live/test_live_fault.py.

The mock's /health_generate follows SGLang 0.5.23's (sglang/srt/entrypoints/http_server.py: 200 when the
scheduler answers, 503 after SGLANG_HEALTH_CHECK_TIMEOUT without); a SIGSTOPped mock process is a hung server, a
SIGKILLed one a dead server, as for the real one.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from grpo_megatron.models.weight_stream import pack
from grpo_megatron.parallel import free_port
from grpo_megatron.rollout.engines.base import SamplingParams
from grpo_megatron.rollout.sglang import DistributedSync, ProbeCheck, RetryPolicy, SGLangEngine, ServerPool, TensorSync
from grpo_megatron.rollout.sglang.errors import ServerUnavailableError
from grpo_megatron.rollout.sglang.health import HealthPolicy, Verdict, check_health
from grpo_megatron.rollout.sglang.keeper import read_states
from grpo_megatron.rollout.sglang.restarters import KeeperServers
from grpo_megatron.rollout.sglang.supervisor import RestartPolicy, ServerSupervisor, State
from tests.conftest import REPO
from tests.sglang.conftest import inject, request_log, running_requests, server_weights, set_token_delay
from tests.sglang.test_weight_sync import assert_holds, new_weights

HEALTH = HealthPolicy(interval_s=0.3, timeout_s=2.0, slow_s=0.5)
PARAMS = SamplingParams(n=2, max_new_tokens=12, temperature=1.0)


def test_distributed_sync_makes_a_new_group_when_the_servers_change(mock, tiny_hf_dir):
    """The supervisor takes a server out of pool.urls and puts it back; the update group must follow."""
    model = tiny_hf_dir("qwen3_moe")
    pool = ServerPool(list(mock), timeout_s=60, retry=RetryPolicy(attempts=2, backoff_s=0.05))
    sync = DistributedSync(pool, 1, 1, "127.0.0.1", free_port(), "gloo")
    try:
        sync.push(new_weights(model, 11), 11)
        pool.urls = mock[:1]  # server 1 out (dead or hung): a group of the trainer and server 0
        sync.push(new_weights(model, 12), 12)
        pool.urls = list(mock)  # back (it still holds its old group, as a server that was only unreachable)
        weights = new_weights(model, 13)
        sync.push(weights, 13)
        for url in mock:
            assert_holds(server_weights(url), weights)
        assert request_log(mock[1]).count("/init_weights_update_group") == 2
        assert request_log(mock[0]).count("/init_weights_update_group") == 3
    finally:
        sync.close()


@pytest.fixture(scope="module")
def kept(tiny_hf_dir, tmp_path_factory):
    """Two mock servers, each run by a keeper; yields (urls, control dir, model dir)."""
    model = tiny_hf_dir("qwen3_moe")
    control = tmp_path_factory.mktemp("keepers")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    keepers, urls = [], []
    for i in range(2):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        keepers.append(subprocess.Popen(
            [sys.executable, "-m", "grpo_megatron.rollout.sglang.keeper", "--dir", str(control), "--name", f"s{i}",
             "--url", url, "--log", str(control / f"s{i}.log"), "--",
             sys.executable, "-m", "tests.sglang.mock_server", str(model), str(port)], cwd=REPO, env=env))
        urls.append(url)
    try:
        for url in urls:
            wait_up(url, 300)
        yield urls, control, model
    finally:
        for keeper in keepers:
            keeper.terminate()
        for keeper in keepers:
            keeper.wait(60)


def wait_up(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{url} did not come up"
        time.sleep(0.2)


def server_pid(control: Path, url: str) -> int:
    return read_states(control)[url]["pid"]


def make_engine(urls, control, model, restarts=RestartPolicy(per_server=3, per_hour=6, timeout_s=300),
                owned=True) -> SGLangEngine:
    pool = ServerPool(urls, timeout_s=60, retry=RetryPolicy(attempts=3, backoff_s=0.05))
    supervisor = ServerSupervisor(pool, HEALTH, restarts, KeeperServers(control) if owned else None).start()
    probe = ProbeCheck(model, list(range(1, 9)), tolerance=1e-3)
    return SGLangEngine(pool, TensorSync(pool, 64, tp_size=1), max_in_flight=8, probe=probe, supervisor=supervisor)


def wait_state(engine: SGLangEngine, url: str, state: State, timeout_s: float) -> float:
    start = time.monotonic()
    while engine.supervisor.states[url] != state:
        assert time.monotonic() - start < timeout_s, f"{url} is {engine.supervisor.states[url]}, not {state}"
        time.sleep(0.05)
    return time.monotonic() - start


def generate_in_thread(engine: SGLangEngine, prompts) -> tuple[threading.Thread, list]:
    box: list = []
    thread = threading.Thread(target=lambda: box.append(engine.generate(prompts, PARAMS)))
    thread.start()
    return thread, box


def wait_running(url: str) -> None:
    deadline = time.monotonic() + 30
    while running_requests(url) == 0:
        assert time.monotonic() < deadline, "no request reached the server"
        time.sleep(0.02)


def check_samples(out, prompts, version: int | None) -> None:
    """Every prompt has its n samples, none lost and none twice, all from the pushed weights."""
    assert len(out) == len(prompts)
    for prompt, samples in zip(prompts, out):
        assert len(samples) == PARAMS.n
        assert all(s.prompt_ids == prompt and version in (None, s.weight_version) for s in samples)


PROMPTS = [[1 + i, 2, 3 + i] for i in range(6)]


def test_health_verdicts(mock):
    url = mock[0]
    assert check_health(url, 2.0, 0.5)[0] == Verdict.OK
    assert check_health(f"http://127.0.0.1:{free_port()}", 2.0, 0.5)[0] == Verdict.DEAD
    httpx.post(url + "/_mock/config", json={"health_delay_s": 0.8}).raise_for_status()
    assert check_health(url, 2.0, 0.5)[0] == Verdict.SLOW
    assert check_health(url, 0.4, 0.2)[0] == Verdict.HUNG  # no answer within the time-out
    httpx.post(url + "/_mock/config", json={"health_delay_s": 0.0}).raise_for_status()
    inject(url, "/health_generate", "503")
    verdict, _, detail = check_health(url, 2.0, 0.5)
    assert verdict == Verdict.HUNG and "503" in detail


def test_slow_server_is_not_taken_out(mock):
    urls = mock
    pool = ServerPool(urls, timeout_s=60, retry=RetryPolicy(attempts=3, backoff_s=0.05))
    supervisor = ServerSupervisor(pool, HEALTH, RestartPolicy()).start()
    try:
        httpx.post(urls[0] + "/_mock/config", json={"health_delay_s": 0.8}).raise_for_status()
        time.sleep(2.5)  # several checks, each slow
        assert supervisor.states[urls[0]] == State.SERVING and pool.serving == urls
    finally:
        httpx.post(urls[0] + "/_mock/config", json={"health_delay_s": 0.0})
        supervisor.stop()


def test_killed_server_restarts_and_serves_only_after_a_full_sync(kept):
    urls, control, model = kept
    for url in urls:
        httpx.post(url + "/_mock/reset", json={})
    engine = make_engine(urls, control, model)
    try:
        engine.update_weights(new_weights(model, 1), 1)
        for url in urls:
            set_token_delay(url, 0.05)
        thread, box = generate_in_thread(engine, PROMPTS)
        wait_running(urls[1])
        os.kill(server_pid(control, urls[1]), signal.SIGKILL)
        thread.join(120)
        check_samples(box[0], PROMPTS, 1)
        set_token_delay(urls[0], 0.0)
        wait_state(engine, urls[1], State.STALE, 120)  # restarted by its keeper, weights not yet pushed
        out = engine.generate(PROMPTS, PARAMS)  # the restarted server has the base weights: it must get none
        check_samples(out, PROMPTS, 1)
        assert "/generate" not in request_log(urls[1])
        assert engine.pool.serving == urls[:1] and engine.serves_last_push() is False
        changed = new_weights(model, 2)[:4]  # a changed-only push (sync_changed_only) must leave it out
        engine.push_buckets(pack(changed, engine.sync.bucket_bytes, engine.sync.alloc), 2, complete=False)
        assert engine.supervisor.states[urls[1]] == State.STALE
        assert "/update_weights_from_tensor" not in request_log(urls[1])
        engine.update_weights(new_weights(model, 3), 3)  # full: the restarted server joins it, then the probe
        log = request_log(urls[1])
        assert log.index("/end_weight_update") < log.index("/generate")  # the probe's /generate, after the sync
        assert engine.supervisor.states[urls[1]] == State.SERVING and engine.pool.serving == urls
        engine.generate(PROMPTS, PARAMS)
        assert request_log(urls[1]).count("/generate") > 1  # serves again
        metrics = engine.sync_metrics()
        assert metrics["fault/restarts"] == 1 and metrics["fault/reissued_requests"] >= 1
        assert metrics["fault/down_s/server1"] > 0 and metrics["fault/down_s/server0"] == 0
        assert metrics["weight_sync/probe_max_abs_diff"] < 1e-3
    finally:
        for url in urls:
            set_token_delay(url, 0.0)
        engine.shutdown()


@pytest.mark.slow  # a mock server restart each: ~5 s of CPU, ~30 s on a loaded machine
def test_hung_server_is_detected_in_time_and_its_requests_reissued(kept):
    urls, control, model = kept
    engine = make_engine(urls, control, model)
    try:
        engine.update_weights(new_weights(model, 3), 3)
        for url in urls:
            set_token_delay(url, 0.05)
        thread, box = generate_in_thread(engine, PROMPTS)
        wait_running(urls[0])
        os.kill(server_pid(control, urls[0]), signal.SIGSTOP)
        stopped = time.monotonic()
        detected = wait_state(engine, urls[0], State.RESTARTING, HEALTH.interval_s + HEALTH.timeout_s + 2)
        thread.join(120)
        check_samples(box[0], PROMPTS, 3)  # the stopped server's requests finished elsewhere, exactly once each
        print(f"hung server out after {time.monotonic() - stopped:.2f} s (check {detected:.2f} s)")
        wait_state(engine, urls[0], State.STALE, 120)  # the keeper SIGKILLs the stopped process and starts anew
        engine.update_weights(new_weights(model, 4), 4)
        assert engine.supervisor.states[urls[0]] == State.SERVING
    finally:
        for url in urls:
            set_token_delay(url, 0.0)
        engine.shutdown()


@pytest.mark.slow  # a mock server restart each: ~5 s of CPU, ~30 s on a loaded machine
def test_push_during_a_restart_excludes_the_server(kept):
    urls, control, model = kept
    engine = make_engine(urls, control, model)
    try:
        os.kill(server_pid(control, urls[1]), signal.SIGKILL)
        wait_state(engine, urls[1], State.RESTARTING, 10)
        engine.update_weights(new_weights(model, 5), 5)  # goes to the live server only
        assert engine.supervisor.states[urls[1]] in (State.RESTARTING, State.STALE)
        wait_state(engine, urls[1], State.STALE, 120)
        assert "/update_weights_from_tensor" not in request_log(urls[1])
        engine.update_weights(new_weights(model, 6), 6)
        assert engine.supervisor.states[urls[1]] == State.SERVING
    finally:
        engine.shutdown()


@pytest.mark.slow  # a mock server restart each: ~5 s of CPU, ~30 s on a loaded machine
def test_user_server_is_reported_not_restarted_and_rejoins_after_a_sync(kept):
    urls, control, model = kept
    engine = make_engine(urls, control, model, owned=False)
    try:
        starts = read_states(control)[urls[0]]["starts"]
        os.kill(server_pid(control, urls[0]), signal.SIGKILL)
        wait_state(engine, urls[0], State.DOWN, 10)
        time.sleep(1.0)
        assert read_states(control)[urls[0]]["starts"] == starts  # nobody restarted it
        check_samples(engine.generate(PROMPTS, PARAMS), PROMPTS, None)
        KeeperServers(control).restart(urls[0], 300)  # its owner brings it back
        wait_state(engine, urls[0], State.STALE, 30)
        engine.update_weights(new_weights(model, 7), 7)
        assert engine.supervisor.states[urls[0]] == State.SERVING
    finally:
        engine.shutdown()


def test_restart_bound_ends_the_run_naming_the_server_and_its_log(kept):
    urls, control, model = kept
    engine = make_engine(urls, control, model, restarts=RestartPolicy(per_server=0, per_hour=6, timeout_s=300))
    try:
        os.kill(server_pid(control, urls[0]), signal.SIGKILL)
        wait_state(engine, urls[0], State.FAILED, 10)
        with pytest.raises(ServerUnavailableError) as err:
            engine.generate(PROMPTS, PARAMS)
        message = str(err.value)
        assert urls[0] in message and "max_restarts_per_server=0" in message
        assert str(control / "s0.log") in message
    finally:
        engine.shutdown()  # the last test here: the fixture's teardown stops both keepers


@pytest.mark.slow  # a mock server start and restart
def test_launcher_servers_restart_in_place(tiny_hf_dir, tmp_path):
    """LaunchedServers (servers this process started with the launcher): SIGKILL of the group, same command."""
    from dataclasses import dataclass

    from grpo_megatron.rollout.sglang.launcher import SGLangServer
    from grpo_megatron.rollout.sglang.restarters import LaunchedServers

    @dataclass
    class MockSpec:  # what SGLangServer needs of a ServerSpec: the address, the key and the command
        port: int
        host: str = "127.0.0.1"
        api_key: str | None = None

        @property
        def url(self) -> str:
            return f"http://{self.host}:{self.port}"

        def command(self) -> list[str]:
            return [sys.executable, "-m", "tests.sglang.mock_server", str(tiny_hf_dir("qwen3_moe")), str(self.port)]

    server = SGLangServer(MockSpec(free_port()), tmp_path / "mock.log", env={"PYTHONPATH": str(REPO)}).start()
    try:
        server.wait_healthy(300)
        first = server.process.pid
        os.kill(first, signal.SIGSTOP)  # hung: the restart must end it anyway
        LaunchedServers([server]).restart(server.spec.url, 300)
        assert server.process.pid != first and check_health(server.spec.url, 5, 5)[0] == Verdict.OK
    finally:
        server.stop(grace_s=10)
