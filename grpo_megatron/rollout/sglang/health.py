"""Health checks of SGLang servers: a one-token generation probe that tells dead from hung from slow.

SGLang 0.5.23's GET /health_generate (also /health, since SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION defaults on;
sglang/srt/entrypoints/http_server.py) submits a one-token generation and answers 200 as soon as the scheduler
has sent anything since the request came in (so under load it costs nothing: running requests' output counts),
polling once a second; it answers 503 when nothing came for SGLANG_HEALTH_CHECK_TIMEOUT (20 s), and 503 while
the server starts or shuts down. So:
- dead: the connection is refused or dropped (no process listens any more);
- hung: the HTTP front end accepts but gives no answer within `timeout_s`, or answers 503 (its own verdict that
  the scheduler is wedged);
- slow: 200, but later than `slow_s`: logged, never acted on (a loaded server is not a broken one).
"""
from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx

logger = logging.getLogger(__name__)


class Verdict(str, enum.Enum):
    OK = "ok"
    SLOW = "slow"
    HUNG = "hung"
    DEAD = "dead"


@dataclass(frozen=True)
class HealthPolicy:
    """Defaults from the peers' and SGLang's numbers: slime checks every 10 s with a 5 s timeout; SGLang itself
    gives up on a silent scheduler after 20 s, so an HTTP answer missing for 30 s (20 s + a margin for a loaded
    front end) means the front end is stuck too. 5 s (slime's timeout) is where an answer counts as slow."""

    interval_s: float = 10.0
    timeout_s: float = 30.0
    slow_s: float = 5.0

    def validate(self) -> None:
        if self.interval_s < 0 or self.timeout_s <= 0 or self.slow_s <= 0:
            raise ValueError(f"rollout.sglang health settings interval_s={self.interval_s}, timeout_s="
                             f"{self.timeout_s}, slow_s={self.slow_s}: use interval >= 0 (0 = off) and positive "
                             f"time-outs")


def check_health(url: str, timeout_s: float, slow_s: float, headers: dict[str, str] | None = None
                 ) -> tuple[Verdict, float, str]:
    """One probe of `url`: (verdict, seconds it took, what was seen)."""
    start = time.monotonic()
    try:
        response = httpx.get(url + "/health_generate", headers=headers or {}, timeout=timeout_s, trust_env=False)
    except httpx.TimeoutException:
        return Verdict.HUNG, time.monotonic() - start, f"no answer to /health_generate within {timeout_s:g} s"
    except httpx.TransportError as err:
        return Verdict.DEAD, time.monotonic() - start, f"{type(err).__name__}: {err}"
    seconds = time.monotonic() - start
    if response.status_code != 200:
        return Verdict.HUNG, seconds, f"/health_generate answered HTTP {response.status_code} (scheduler silent)"
    if seconds > slow_s:
        return Verdict.SLOW, seconds, f"/health_generate took {seconds:.1f} s"
    return Verdict.OK, seconds, ""


Report = Callable[[str, Verdict, float, str], None]


class HealthWatcher:
    """A daemon thread that checks `watched()` every interval (all servers at once) and hands each verdict to
    `report`; `check_now(url)` asks for one check outside the schedule (a request just failed there)."""

    def __init__(self, watched: Callable[[], list[str]], report: Report, policy: HealthPolicy,
                 headers: dict[str, str] | None = None, suspended: Callable[[], bool] = lambda: False):
        self.watched, self.report, self.policy = watched, report, policy
        self.headers, self.suspended = headers or {}, suspended
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._checking: set[str] = set()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(8, thread_name_prefix="sglang-health")
        self._thread = threading.Thread(target=self._run, name="sglang-health-watcher", daemon=True)

    def start(self) -> None:
        if self.policy.interval_s > 0:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(self.policy.timeout_s + 5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def check_now(self, url: str) -> None:
        if not self._stop.is_set():
            self._submit(url)

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.suspended():
                for url in self.watched():
                    self._submit(url)
            self._wake.wait(self.policy.interval_s)
            self._wake.clear()

    def _submit(self, url: str) -> None:
        with self._lock:
            if url in self._checking:  # one check per server at a time: a hung one is not probed twice
                return
            self._checking.add(url)
        try:
            self._pool.submit(self._check, url)
        except RuntimeError:  # shut down
            pass

    def _check(self, url: str) -> None:
        try:
            verdict, seconds, detail = check_health(url, self.policy.timeout_s, self.policy.slow_s, self.headers)
            if not self._stop.is_set() and not self.suspended():
                self.report(url, verdict, seconds, detail)
        except Exception:  # noqa: BLE001 - a watcher that dies silently would stop all fault handling
            logger.exception("health check of %s failed", url)
        finally:
            with self._lock:
                self._checking.discard(url)
