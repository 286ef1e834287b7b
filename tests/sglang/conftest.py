"""Mock SGLang servers (tests/sglang/mock_server.py) in subprocesses, on a tiny local Qwen3-MoE checkpoint."""
from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
import torch
from safetensors.torch import load

from grpo_megatron.parallel import free_port
from tests.conftest import REPO


def _start(model_dir, port: int, tp_size: int = 1, flags: tuple[str, ...] = ()) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "tests.sglang.mock_server", str(model_dir), str(port),
                             "--tp-size", str(tp_size), *flags], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def wait_healthy(url: str, proc: subprocess.Popen, deadline: float) -> None:
    """Poll the mock's /health until 200; raise if its process dies or `deadline` (monotonic) passes."""
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"mock server {url} died: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"mock server {url} did not start")
        time.sleep(0.3)


@contextmanager
def mock_servers(model_dir, count: int, tp_size: int = 1,
                 flags: tuple[str, ...] = ()) -> Iterator[tuple[list[str], list[subprocess.Popen]]]:
    """`count` mock servers of `tp_size` TP ranks each, started with SGLang's `flags`: their URLs and processes,
    stopped on exit."""
    ports = [free_port() for _ in range(count)]
    procs = [_start(model_dir, p, tp_size, flags) for p in ports]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    try:
        deadline = time.monotonic() + 300  # a loaded CI machine needs minutes
        for url, proc in zip(urls, procs):
            wait_healthy(url, proc, deadline)
        yield urls, procs
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:  # a loaded machine once kept one past 10 s at the session's end
                proc.kill()
                proc.wait()


@pytest.fixture(scope="session")
def mock_urls(tiny_hf_dir):
    """Two mock servers serving the same tiny Qwen3-MoE; yields their URLs."""
    with mock_servers(tiny_hf_dir("qwen3_moe"), 2) as (urls, _):
        yield urls


@pytest.fixture(scope="session")
def mock_tp2_urls(tiny_hf_dir):
    """Two mock servers of two TP ranks each (`--tp-size 2`), for the per-rank weight sync contract."""
    with mock_servers(tiny_hf_dir("qwen3_moe"), 2, tp_size=2) as (urls, _):
        yield urls


@pytest.fixture(scope="session")
def mock_gpu_config_url(tiny_hf_dir):
    """One mock server started as the GPU scripts start SGLang: deterministic inference and the memory saver,
    without weights CPU backup (slurm/common.sh)."""
    flags = ("--enable-deterministic-inference", "--enable-memory-saver")
    with mock_servers(tiny_hf_dir("qwen3_moe"), 1, flags=flags) as (urls, _):
        yield urls[0]


def _reset(urls: list[str]) -> list[str]:
    for url in urls:
        httpx.post(url + "/_mock/reset", json={})
    return urls


@pytest.fixture
def mock(mock_urls):
    """The servers with faults and request logs cleared."""
    return _reset(mock_urls)


@pytest.fixture
def mock_tp2(mock_tp2_urls):
    """The TP=2 servers with faults and request logs cleared."""
    return _reset(mock_tp2_urls)


def inject(url: str, route: str, kind: str, count: int = 1, seconds: float = 30) -> None:
    """A fault on the next `count` requests to `route`: 500, drop, malformed, routed_experts_size, or hang
    (`seconds` before the request is handled)."""
    httpx.post(url + "/_mock/fault", json={"route": route, "kind": kind, "count": count,
                                           "seconds": seconds}).raise_for_status()


def request_log(url: str) -> list[str]:
    return httpx.get(url + "/_mock/log").json()["log"]


def weight_updates(url: str) -> list[dict]:
    """Per update request the server applied: route, names, ignored names, weight_version, flush_cache."""
    return httpx.get(url + "/_mock/log").json()["updates"]


def running_requests(url: str) -> int:
    return httpx.get(url + "/_mock/log").json()["running"]


def set_token_delay(url: str, seconds: float) -> None:
    """Pace the mock's decoding so a test can pause or abort requests while they run."""
    httpx.post(url + "/_mock/config", json={"token_delay_s": seconds}).raise_for_status()


def server_weights(url: str, rank: int = 0) -> dict[str, torch.Tensor]:
    """The checkpoint tensors TP rank `rank` of the server holds."""
    body = httpx.get(url + f"/_mock/weights?rank={rank}", timeout=30).json()
    return load(base64.b64decode(body["safetensors"]))
