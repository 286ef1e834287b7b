"""HTTP to one or several SGLang servers: retries with backoff, failover and least-loaded balancing.

Connection errors and 5xx answers are retried (with exponential backoff, moving to another server when there
is one); a 4xx or a body that is not JSON fails at once with an error naming the server, because repeating those
would only repeat the failure. A timeout fails at once too, except for requests that say they may be repeated
(`post(..., retry_timeouts=True)`: a generation is aborted on its server by its rid, then sent again). A server that keeps failing raises ServerUnavailableError
naming its URL instead of hanging the trainer.

With a supervisor (supervisor.py) the pool's membership moves: `urls` are the servers that hold the pushed
weights (weight sync, probe, pause), `serving` the ones generation may use; `evict` re-issues the requests in
flight on a server taken out, and the hooks tell the supervisor about failures as they happen.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import ssl
import threading
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from grpo_megatron.rollout.sglang.errors import (
    MalformedResponseError, ServerRequestError, ServerTimeoutError, ServerUnavailableError,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4  # tries per request, across servers
    backoff_s: float = 0.5  # first wait; doubled after each failure
    max_backoff_s: float = 8.0

    def delay(self, failure: int) -> float:
        return min(self.backoff_s * 2 ** failure, self.max_backoff_s)


class Retryable(Exception):
    """A failure worth trying again (connection error, 5xx, aborted generation); raised by handlers too."""


class ConnectionLost(Retryable):
    """No connection, or it broke before the answer: the server may be gone (its supervisor checks it)."""


class _Evicted(Exception):
    """The request's server was taken out of the pool while it ran; it goes to another one."""


class ServerPool:
    """The set of servers rollouts go to; `post` picks the least-loaded healthy one per request."""

    def __init__(self, urls: list[str], api_key: str | None = None, timeout_s: float = 300.0,
                 retry: RetryPolicy = RetryPolicy()):
        if not urls:
            raise ValueError("rollout.sglang.urls is empty; give at least one server URL (http://127.0.0.1:30000)")
        self.urls = [u.rstrip("/") for u in urls]
        self.timeout_s = timeout_s
        self.retry = retry
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._in_flight = dict.fromkeys(self.urls, 0)
        self._failures = dict.fromkeys(self.urls, 0)  # consecutive failures: a failing server is picked last
        self.serving = list(self.urls)  # where generation goes (a supervisor takes servers out and back in)
        self.fatal: Exception | None = None  # set by a supervisor that gave up: requests waiting for a server fail
        self.wait_s = 900.0  # how long a request waits for a serving server (a supervisor sets its restart time)
        self.on_suspect: Callable[[str], None] | None = None  # a request failed there (non-blocking)
        self.on_fault: Callable[[str, str], bool] | None = None  # a control request failed: True = taken out
        self.reissued = 0  # requests sent again because their server was lost
        self._running: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Task]]] = {}
        self._evicted: set[asyncio.Task] = set()
        self._lock = threading.Lock()

    def only(self, urls: list[str]) -> ServerPool:
        """A pool of some of these servers, with the same key, time-out and retries (e.g. the probe's targets)."""
        return ServerPool(urls, None, self.timeout_s, self.retry)._with_headers(self._headers)

    def _with_headers(self, headers: dict[str, str]) -> ServerPool:
        self._headers = headers
        return self

    def evict(self, url: str) -> int:
        """Cancel the requests in flight on `url` (from any thread); each is sent again to another server."""
        with self._lock:
            running = list(self._running.get(url, ()))
            self._evicted.update(task for _, task in running)
        for loop, task in running:
            loop.call_soon_threadsafe(task.cancel)
        return len(running)

    @functools.cached_property
    def _tls(self) -> ssl.SSLContext:
        """One TLS context for every client of this pool: making one loads the CA bundle, ~17 ms of CPU,
        which a client per request (every push makes several) paid each time, on the trainer's core."""
        return httpx.create_ssl_context()

    def client(self, max_connections: int) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        return httpx.AsyncClient(headers=self._headers, limits=limits, timeout=self.timeout_s, trust_env=False,
                                 verify=self._tls)

    async def post(self, client: httpx.AsyncClient, path: str, payload: dict[str, Any],
                   handle: Callable[[str, Any], T], timeout_s: float | None = None,
                   retry_timeouts: bool = False) -> T:
        """POST to the best server and return handle(url, json body); handle may raise Retryable.

        timeout_s: this request's bound (default the pool's). retry_timeouts: a /generate that may be repeated
        without duplicating a sample (it has its own seed): each attempt gets a fresh rid, and a timed-out one is
        aborted on its server (/abort_request by rid) before the next attempt."""
        errors: dict[str, str] = {}
        attempt = 0
        while attempt < self.retry.attempts:
            url = await self._pick()
            self._in_flight[url] = self._in_flight.get(url, 0) + 1
            sent = dict(payload, rid=uuid.uuid4().hex) if retry_timeouts else payload
            try:
                try:
                    body = await self._tracked(client, url, path, sent, timeout_s)
                except ServerTimeoutError as err:
                    if not retry_timeouts:
                        raise
                    await self._abort(client, url, sent["rid"])
                    raise Retryable(str(err)) from err
                result = handle(url, body)
            except _Evicted:
                self.reissued += 1  # not a failed attempt: the supervisor logged the eviction once
                continue
            except Retryable as err:
                self._failures[url] = self._failures.get(url, 0) + 1
                errors[url] = str(err)
                attempt += 1
                lost = isinstance(err, ConnectionLost) and self.on_suspect is not None  # the supervisor logs it once
                (logger.debug if lost else logger.warning)("%s%s failed (attempt %d/%d): %s", url, path, attempt,
                                                           self.retry.attempts, err)
                if lost:
                    self.reissued += 1
                    self.on_suspect(url)
                if attempt < self.retry.attempts:
                    await asyncio.sleep(self.retry.delay(attempt - 1))
                continue
            finally:
                self._in_flight[url] -= 1
            self._failures[url] = 0
            return result
        raise ServerUnavailableError(f"{path} failed {self.retry.attempts} times; last error per server: "
                                     + "; ".join(f"{u}: {e}" for u, e in errors.items()))

    async def _pick(self) -> str:
        """The least-loaded serving server; waits while none serves (all restarting) unless the supervisor gave up,
        at most `wait_s`."""
        deadline = None
        while True:
            serving = self.serving
            if serving:
                return min(serving, key=lambda u: (self._failures.get(u, 0), self._in_flight.get(u, 0)))
            if self.fatal is not None:
                raise self.fatal
            deadline = deadline or asyncio.get_running_loop().time() + self.wait_s
            if asyncio.get_running_loop().time() > deadline:
                raise ServerUnavailableError(f"no SGLang server has served for {self.wait_s:.0f} s (all down or "
                                             f"restarting, rollout.sglang.restart_timeout_s); see the log lines above")
            await asyncio.sleep(0.1)

    async def _tracked(self, client: httpx.AsyncClient, url: str, path: str, payload: dict[str, Any],
                       timeout_s: float | None = None) -> Any:
        """One POST that `evict` can cancel from another thread (then _Evicted)."""
        task = asyncio.ensure_future(self._request(client, "POST", url, path, payload, timeout_s))
        entry = (asyncio.get_running_loop(), task)
        with self._lock:
            self._running.setdefault(url, set()).add(entry)
        try:
            return await task
        except asyncio.CancelledError:
            with self._lock:
                evicted = task in self._evicted
            if evicted and task.cancelled():
                raise _Evicted() from None
            raise
        finally:
            with self._lock:
                self._running[url].discard(entry)
                self._evicted.discard(task)

    def call(self, url: str, method: str, path: str, payload: dict[str, Any] | None = None,
             timeout_s: float | None = None, retry: bool = True) -> Any:
        """One control request to one server (weight sync, cache, pause), retried on connection errors/5xx.

        retry=False for requests that must not be repeated (a distributed update waits for one broadcast).
        """
        return asyncio.run(self.acall(url, method, path, payload, timeout_s, retry))

    async def acall(self, url: str, method: str, path: str, payload: dict[str, Any] | None = None,
                    timeout_s: float | None = None, retry: bool = True) -> Any:
        async with httpx.AsyncClient(headers=self._headers, timeout=timeout_s or self.timeout_s,
                                     trust_env=False, verify=self._tls) as client:
            attempts = self.retry.attempts if retry else 1
            try:
                return await self._with_retries(url, path, attempts,
                                                lambda: self._request(client, method, url, path, payload))
            except (ServerUnavailableError, ServerTimeoutError) as err:
                # A supervisor that finds the server dead or hung takes it out: the request is dropped (None),
                # the server gets a full weight sync when it is back.
                if self.on_fault is not None and await asyncio.to_thread(self.on_fault, url, str(err)):
                    logger.warning("%s%s dropped: the server was taken out of the pool", url, path)
                    return None
                raise

    async def _with_retries(self, url: str, path: str, attempts: int, send: Callable[[], Awaitable[T]]) -> T:
        last = ""
        for attempt in range(attempts):
            try:
                return await send()
            except Retryable as err:
                last = str(err)
                logger.warning("%s%s failed (attempt %d/%d): %s", url, path, attempt + 1, attempts, err)
                if attempt + 1 < attempts:
                    await asyncio.sleep(self.retry.delay(attempt))
        raise ServerUnavailableError(f"SGLang server {url} is unavailable: {path} failed {attempts} time(s), "
                                     f"last: {last}")

    async def _abort(self, client: httpx.AsyncClient, url: str, rid: str) -> None:
        """Best effort: stop a request the client gave up on, so that the server does not finish it for nobody."""
        try:
            await self._request(client, "POST", url, "/abort_request", {"rid": rid}, timeout_s=30.0)
        except Exception as err:  # noqa: BLE001  (the retry goes on either way)
            logger.warning("%s/abort_request for a timed-out generation failed: %s", url, err)

    async def _request(self, client: httpx.AsyncClient, method: str, url: str, path: str,
                       payload: dict[str, Any] | None, timeout_s: float | None = None) -> Any:
        """JSON body (or text for SGLang's plain-text routes) of one request; raises typed errors."""
        timeout = client.timeout if timeout_s is None else httpx.Timeout(timeout_s)
        try:
            response = await client.request(method, url + path, json=payload, timeout=timeout)
        except httpx.TimeoutException as err:
            raise ServerTimeoutError(f"{url}{path}: no answer within {timeout.read}s (rollout.sglang.timeout_s; "
                                     f"/generate: + timeout_per_token_s x max_new_tokens)") from err
        except httpx.TransportError as err:
            raise ConnectionLost(f"connection error: {type(err).__name__}: {err}") from err
        if response.status_code >= 500:
            raise Retryable(f"HTTP {response.status_code}: {response.text[:200]}")
        if response.status_code >= 400:
            raise ServerRequestError(f"{url}{path} answered HTTP {response.status_code}: {_message(response)}")
        if not response.content or "json" not in response.headers.get("content-type", ""):
            return response.text
        try:
            body = response.json()
        except json.JSONDecodeError as err:
            raise MalformedResponseError(f"{url}{path}: response is not valid JSON ({err}): "
                                         f"{response.text[:200]!r}") from err
        if isinstance(body, dict) and body.get("success") is False:
            raise ServerRequestError(f"{url}{path} failed: {body.get('message', body)}")
        return body


def _message(response: httpx.Response) -> str:
    """The error text of SGLang's error bodies ({"error": {"message"}} or ErrorResponse {"message"})."""
    try:
        body = response.json()
    except json.JSONDecodeError:
        return response.text[:300]
    if isinstance(body, dict):
        inner = body.get("error")
        if isinstance(inner, dict) and "message" in inner:
            return str(inner["message"])
        if "message" in body:
            return str(body["message"])
    return str(body)[:300]
