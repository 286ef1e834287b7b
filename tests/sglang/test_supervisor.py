"""The supervisor's state machine on its own (no server): verdicts are reported by hand and restarts are a
recorder, so the orderings that real servers hit only by chance are set up exactly. With servers:
test_fault_tolerance.py (mock) and tests/sglang_live/test_live_fault.py (real SGLang)."""
from __future__ import annotations

import threading
import time

import pytest

from grpo_megatron.rollout.sglang.errors import ServerUnavailableError
from grpo_megatron.rollout.sglang.health import HealthPolicy, Verdict
from grpo_megatron.rollout.sglang.supervisor import RestartPolicy, ServerSupervisor, State
from grpo_megatron.rollout.sglang.transport import ServerPool

pytestmark = pytest.mark.unit  # the supervisor's policy on stand-in servers: no process, no model

URLS = ["http://10.0.0.1:30000", "http://10.0.0.2:30000"]
OFF = HealthPolicy(interval_s=0)  # no watcher thread: verdicts come from the test


class Restarts:
    """A Restarter that owns every server and returns when `gate` is set (each restart is recorded)."""

    def __init__(self, fail: int = 0):
        self.gate = threading.Event()
        self.gate.set()
        self.done: list[str] = []
        self.fail = fail  # the first `fail` restarts raise

    def owns(self, url: str) -> bool:
        return True

    def log_path(self, url: str) -> str:
        return f"/logs/{url.rsplit(':', 1)[0].rsplit('/', 1)[1]}.log"

    def restart(self, url: str, timeout_s: float) -> None:
        self.gate.wait(10)
        self.done.append(url)
        if len(self.done) <= self.fail:
            raise ServerUnavailableError(f"{url} did not come back")


def wait_for(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def make(restarts: Restarts | None, policy: RestartPolicy = RestartPolicy()) -> tuple[ServerSupervisor, ServerPool]:
    pool = ServerPool(list(URLS))
    return ServerSupervisor(pool, OFF, policy, restarts), pool


def test_a_restart_that_ends_during_a_push_joins_only_the_next_full_push():
    restarts = Restarts()
    restarts.gate.clear()
    sup, pool = make(restarts)
    sup.report(URLS[1], Verdict.DEAD, 0.0, "refused")
    assert sup.states[URLS[1]] == State.RESTARTING and pool.serving == URLS[:1] and pool.urls == URLS[:1]
    with sup.pushing(complete=True) as targets:
        restarts.gate.set()  # the server is back while the push runs
        wait_for(lambda: restarts.done)
        time.sleep(0.1)
        assert targets == URLS[:1] and pool.urls == URLS[:1]  # it gets none of this push's buckets
        assert sup.states[URLS[1]] == State.RESTARTING
    wait_for(lambda: sup.states[URLS[1]] == State.STALE)
    assert pool.serving == URLS[:1]  # up, but without the trainer's weights: no generation
    with sup.pushing(complete=False) as targets:  # changed-only: not for a server that has nothing
        assert targets == URLS[:1]
    assert sup.states[URLS[1]] == State.STALE and sup.has_stale()
    with sup.pushing(complete=True) as targets:
        assert targets == URLS
    assert sup.states[URLS[1]] == State.SYNCED and pool.serving == URLS[:1]  # pushed, not yet checked
    sup.synced(3, probed=True)
    assert sup.states[URLS[1]] == State.SERVING and pool.serving == URLS and sup.all_serving()


def test_a_push_that_fails_leaves_the_joining_server_stale():
    sup, pool = make(Restarts())
    sup.report(URLS[0], Verdict.HUNG, 30.0, "no answer")
    wait_for(lambda: sup.states[URLS[0]] == State.STALE)
    with pytest.raises(RuntimeError):
        with sup.pushing(complete=True):
            raise RuntimeError("the transfer broke")
    assert sup.states[URLS[0]] == State.STALE and pool.urls == URLS[1:]


def test_users_servers_are_reported_and_rejoin_when_they_answer():
    sup, pool = make(None)
    sup.report(URLS[0], Verdict.DEAD, 0.0, "refused")
    assert sup.states[URLS[0]] == State.DOWN and URLS[0] in sup._watched()  # still checked, never restarted
    sup.report(URLS[0], Verdict.OK, 0.1, "")
    assert sup.states[URLS[0]] == State.STALE and pool.serving == URLS[1:]


def test_slow_is_not_acted_on():
    sup, pool = make(Restarts())
    sup.report(URLS[0], Verdict.SLOW, 7.0, "took 7 s")
    assert sup.states[URLS[0]] == State.SERVING and pool.serving == URLS


def test_the_per_server_bound_fails_the_run_naming_the_server_and_its_log():
    restarts = Restarts()
    sup, pool = make(restarts, RestartPolicy(per_server=1, per_hour=10))
    sup.report(URLS[1], Verdict.DEAD, 0.0, "refused")
    wait_for(lambda: sup.states[URLS[1]] == State.STALE)
    sup.report(URLS[1], Verdict.DEAD, 0.0, "refused")
    wait_for(lambda: sup.states[URLS[1]] == State.FAILED)
    with pytest.raises(ServerUnavailableError) as err:
        sup.raise_if_failed()
    message = str(err.value)
    assert URLS[1] in message and "max_restarts_per_server=1" in message and "/logs/10.0.0.2.log" in message
    assert pool.fatal is sup.failure and restarts.done == [URLS[1]]


def test_failed_restarts_count_and_the_hourly_bound_covers_all_servers():
    restarts = Restarts(fail=1)
    sup, _ = make(restarts, RestartPolicy(per_server=5, per_hour=2))
    sup.report(URLS[0], Verdict.DEAD, 0.0, "refused")  # restart 1 fails, restart 2 works
    wait_for(lambda: sup.states[URLS[0]] == State.STALE)
    sup.report(URLS[1], Verdict.HUNG, 30.0, "no answer")  # a third restart within the hour
    wait_for(lambda: sup.states[URLS[1]] == State.FAILED)
    assert "max_restarts_per_hour=2" in str(sup.failure) and restarts.done == [URLS[0], URLS[0]]


def test_step_metrics_count_restarts_and_time_out_of_generation():
    sup, _ = make(Restarts())
    sup.step_metrics()
    sup.report(URLS[1], Verdict.DEAD, 0.0, "refused")
    wait_for(lambda: sup.states[URLS[1]] == State.STALE)
    time.sleep(0.2)
    first = sup.step_metrics()
    assert first["fault/restarts"] == 1 and first["fault/servers_serving"] == 1
    assert first["fault/down_s/server1"] >= 0.2 and first["fault/down_s/server0"] == 0
    with sup.pushing(complete=True):
        pass
    time.sleep(0.1)
    sup.synced(1, probed=True)
    second = sup.step_metrics()  # counted from the last call to the rejoin, not again from the fault
    assert second["fault/restarts"] == 0 and 0.1 <= second["fault/down_s/server1"] < first["fault/down_s/server1"]
    assert sup.step_metrics()["fault/down_s/server1"] == 0
