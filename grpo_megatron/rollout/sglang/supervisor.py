"""Which servers may serve: health verdicts, restarts within bounds, and rejoining only after a full weight sync.

The state machine of each server (the engine's docstring says what a request or a push sees in each state):

    SERVING --dead/hung--> DOWN --(job's server, within bounds)--> RESTARTING --healthy--> STALE
    DOWN --(user's server answers again)--> STALE          RESTARTING --failed--> RESTARTING (next try) | FAILED
    STALE --full push--> SYNCED --post-sync probe passes--> SERVING
    STALE/SYNCED --dead/hung--> DOWN                        (a changed-only push leaves STALE servers out)

FAILED (a restart bound reached) ends the run: the next generate or push raises ServerUnavailableError naming the
server and its log. Thread-safety: verdicts come from the watcher's threads, restarts run in their own threads,
the engine calls `pushing` / `synced` from its push thread; one lock guards the states, and a server joins the
push targets only while no push runs (`_push`), so it never gets half a push.
"""
from __future__ import annotations

import contextlib
import enum
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from grpo_megatron.rollout.sglang.errors import ServerUnavailableError
from grpo_megatron.rollout.sglang.health import HealthPolicy, HealthWatcher, Verdict, check_health
from grpo_megatron.rollout.sglang.restarters import Restarter
from grpo_megatron.rollout.sglang.transport import ServerPool

logger = logging.getLogger(__name__)


class State(str, enum.Enum):
    SERVING = "serving"
    DOWN = "down"
    RESTARTING = "restarting"
    STALE = "stale"  # up, without the current weights
    SYNCED = "synced"  # has the current weights, probe not yet passed
    FAILED = "failed"


@dataclass(frozen=True)
class RestartPolicy:
    """Bounds: a server that needs more than `per_server` restarts in a run, or a job that needs more than
    `per_hour` (all servers, sliding hour), has a cause a restart does not fix (bad node, bad config)."""

    per_server: int = 3
    per_hour: int = 6
    timeout_s: float = 900.0  # a restarted server must answer /health within this (the Slurm scripts' start wait)


class ServerSupervisor:
    def __init__(self, pool: ServerPool, health: HealthPolicy = HealthPolicy(), policy: RestartPolicy = RestartPolicy(),
                 restarter: Restarter | None = None):
        health.validate()
        self.pool, self.health, self.policy, self.restarter = pool, health, policy, restarter
        self.order = list(pool.urls)
        self.states = dict.fromkeys(self.order, State.SERVING)
        self.failure: ServerUnavailableError | None = None
        self._lock = threading.RLock()
        self._push = threading.Lock()
        self._down_since: dict[str, float] = {}
        self._restarts = dict.fromkeys(self.order, 0)
        self._recent: deque[float] = deque()  # restart times, for the hourly bound
        self._step_restarts, self._step_down = 0, dict.fromkeys(self.order, 0.0)
        self._reissued_base, self._mark = 0, time.monotonic()  # counters since the last step_metrics
        self._paused = False
        self._slow: set[str] = set()
        headers = dict(pool._headers)
        self.watcher = HealthWatcher(self._watched, self.report, health, headers,
                                     suspended=lambda: self._push.locked() or self._paused)
        pool.on_suspect = self.watcher.check_now
        pool.wait_s = policy.timeout_s
        pool.on_fault = self._control_fault

    # -- lifecycle --------------------------------------------------------------------------------------------
    def start(self) -> ServerSupervisor:
        self.watcher.start()
        return self

    def stop(self) -> None:
        self.watcher.stop()

    def pause_checks(self, paused: bool) -> None:
        """Off while the servers have released their memory (colocated GPU servers during training)."""
        self._paused = paused

    def raise_if_failed(self) -> None:
        if self.failure is not None:
            raise self.failure

    # -- verdicts ---------------------------------------------------------------------------------------------
    def _watched(self) -> list[str]:
        with self._lock:
            return [u for u in self.order if self.states[u] in (State.SERVING, State.STALE, State.SYNCED)
                    or (self.states[u] == State.DOWN and not self._owned(u))]

    def report(self, url: str, verdict: Verdict, seconds: float, detail: str) -> None:
        """A health verdict on `url` (the watcher's, or a failed request's check)."""
        with self._lock:
            state = self.states[url]
            if verdict in (Verdict.DEAD, Verdict.HUNG) and state in (State.SERVING, State.STALE, State.SYNCED):
                self._take_out(url, verdict, detail)
            elif verdict in (Verdict.OK, Verdict.SLOW) and state == State.DOWN and not self._owned(url):
                self._join(url, f"answers again after {time.monotonic() - self._down_since[url]:.1f} s")
            elif verdict == Verdict.SLOW and url not in self._slow:  # logged once per slow spell
                self._slow.add(url)
                logger.warning("SGLang server %s is slow: %s (rollout.sglang.health_slow_s=%g; not acted on)", url,
                               detail, self.health.slow_s)
            if verdict == Verdict.OK and url in self._slow:
                self._slow.discard(url)
                logger.info("SGLang server %s answers in time again", url)

    def _control_fault(self, url: str, error: str) -> bool:
        """A weight-sync/control request to `url` failed for good: check it now; True if it was taken out."""
        verdict, seconds, detail = check_health(url, self.health.timeout_s, self.health.slow_s, self.pool._headers)
        if verdict in (Verdict.DEAD, Verdict.HUNG):
            with self._lock:
                if self.states[url] in (State.SERVING, State.STALE, State.SYNCED):
                    self._take_out(url, verdict, f"{detail}; a control request failed: {error}")
            return True
        return False

    def _take_out(self, url: str, verdict: Verdict, detail: str) -> None:
        self.states[url] = State.DOWN
        self._down_since[url] = time.monotonic()
        self.pool.serving = [u for u in self.pool.serving if u != url]
        self.pool.urls = [u for u in self.pool.urls if u != url]
        reissued = self.pool.evict(url)
        owned = self._owned(url)
        logger.warning("SGLang server %s is %s (%s): out of the pool, %d request(s) in flight re-issued on the "
                       "others; %s", url, verdict.value, detail, reissued,
                       "restarting it" if owned else "not started by this job: not restarted, it rejoins after a "
                       "full weight sync once it answers again")
        if owned:
            self.states[url] = State.RESTARTING
            threading.Thread(target=self._restart, args=(url,), name=f"sglang-restart-{url}", daemon=True).start()

    def _owned(self, url: str) -> bool:
        return self.restarter is not None and self.restarter.owns(url)

    # -- restarts ---------------------------------------------------------------------------------------------
    def _restart(self, url: str) -> None:
        while True:
            with self._lock:
                now = time.monotonic()
                while self._recent and now - self._recent[0] > 3600:
                    self._recent.popleft()
                bound = None
                if self._restarts[url] >= self.policy.per_server:
                    bound = f"rollout.sglang.max_restarts_per_server={self.policy.per_server}"
                elif len(self._recent) >= self.policy.per_hour:
                    bound = f"rollout.sglang.max_restarts_per_hour={self.policy.per_hour}"
                if bound is not None:
                    return self._fail(url, f"restarted {self._restarts[url]} time(s) already and down again; "
                                           f"{bound} reached")
                self._restarts[url] += 1
                self._recent.append(now)
                self._step_restarts += 1
                attempt = self._restarts[url]
            logger.warning("SGLang server %s: restart %d/%d (log %s)", url, attempt, self.policy.per_server,
                           self.restarter.log_path(url))
            started = time.monotonic()
            try:
                self.restarter.restart(url, self.policy.timeout_s)
            except Exception as err:  # noqa: BLE001 - any failure to come back counts against the bounds
                logger.warning("SGLang server %s: restart %d failed: %s", url, attempt, err)
                continue
            with self._push:  # never joins a push that already runs
                with self._lock:
                    if self.states[url] == State.RESTARTING:
                        self._join(url, f"restarted in {time.monotonic() - started:.1f} s")
            return

    def _fail(self, url: str, why: str) -> None:
        self.states[url] = State.FAILED
        self.failure = ServerUnavailableError(f"SGLang server {url} {why}; see its log {self.restarter.log_path(url)}")
        self.pool.fatal = self.failure
        logger.error("%s", self.failure)

    def _join(self, url: str, why: str) -> None:
        self.states[url] = State.STALE
        logger.warning("SGLang server %s %s; it serves after a full weight sync and the post-sync check", url, why)

    # -- weight pushes ----------------------------------------------------------------------------------------
    def all_serving(self) -> bool:
        with self._lock:
            return all(s == State.SERVING for s in self.states.values())

    def has_stale(self) -> bool:
        with self._lock:
            return any(s == State.STALE for s in self.states.values())

    @contextlib.contextmanager
    def pushing(self, complete: bool) -> Iterator[list[str]]:
        """Hold the push targets still for a push: the servers with the weights, plus the STALE ones when the push
        is complete; they become SYNCED when it ends. Waits while no server is up at all (restarts running)."""
        with self._push:
            deadline = time.monotonic() + self.policy.timeout_s
            while True:
                self.raise_if_failed()
                if time.monotonic() > deadline:
                    raise ServerUnavailableError(f"no SGLang server to push weights to for {self.policy.timeout_s:.0f}"
                                                 f" s (rollout.sglang.restart_timeout_s): {self.states}")
                with self._lock:
                    joining = [u for u in self.order if complete and self.states[u] == State.STALE]
                    targets = [u for u in self.order if self.states[u] in (State.SERVING, State.SYNCED)
                               or u in joining]
                if targets:
                    break
                self._push.release()  # let a restart finish and join
                time.sleep(0.2)
                self._push.acquire()
            self.pool.urls = targets
            try:
                yield targets
            except BaseException:
                with self._lock:
                    self.pool.urls = [u for u in self.pool.urls if u not in joining]
                raise
            with self._lock:
                for url in joining:
                    if self.states[url] == State.STALE and url in self.pool.urls:
                        self.states[url] = State.SYNCED

    def synced(self, version: int, probed: bool) -> None:
        """The last push was checked (`probed`: by the post-sync probe over pool.urls; else each SYNCED server
        must report `version` in /model_info): SYNCED servers serve from now on."""
        with self._lock:
            pending = [u for u in self.order if self.states[u] == State.SYNCED]
        for url in pending:
            if not probed:
                info = self.pool.call(url, "GET", "/model_info")
                if not isinstance(info, dict) or str(info.get("weight_version")) != str(version):
                    raise ServerUnavailableError(f"SGLang server {url} reports weight version "
                                                 f"{info and info.get('weight_version')!r} after the full sync of "
                                                 f"v{version}; see its log {self._log(url)}")
            with self._lock:
                if self.states[url] != State.SYNCED:
                    continue
                self.states[url] = State.SERVING
                now, since = time.monotonic(), self._down_since.pop(url)
                down = now - since
                self._step_down[url] += now - max(since, self._mark)
                self.pool.serving = [u for u in self.order if u in self.pool.serving or u == url]
                self.pool._failures[url] = 0
            logger.warning("SGLang server %s serves again: weights v%d %s, %.1f s after it went down", url, version,
                           "checked by the post-sync probe" if probed else "reported by /model_info", down)

    def _log(self, url: str) -> str:
        return self.restarter.log_path(url) if self._owned(url) else "(a server this job did not start)"

    # -- metrics ----------------------------------------------------------------------------------------------
    def step_metrics(self) -> dict[str, float]:
        """Since the last call: restarts, requests re-issued, and seconds each server was out of generation
        (`fault/down_s/serverI`, I its place in rollout.sglang.urls)."""
        now = time.monotonic()
        with self._lock:
            out = {"fault/restarts": float(self._step_restarts),
                   "fault/reissued_requests": float(self.pool.reissued - self._reissued_base),
                   "fault/servers_serving": float(len(self.pool.serving))}
            for i, url in enumerate(self.order):
                down = self._step_down[url]
                if url in self._down_since:
                    down += now - max(self._down_since[url], self._mark)
                out[f"fault/down_s/server{i}"] = round(down, 3)
            self._step_restarts, self._step_down = 0, dict.fromkeys(self.order, 0.0)
            self._reissued_base, self._mark = self.pool.reissued, now
        return out
