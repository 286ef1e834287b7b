"""Mock SGLang servers (tests/sglang/mock_server.py) in subprocesses, on a tiny local Qwen3-MoE checkpoint."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest

from grpo_megatron.parallel import free_port
from tests.conftest import REPO


def _start(model_dir, port: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "tests.sglang.mock_server", str(model_dir), str(port)], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


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


@pytest.fixture(scope="session")
def mock_urls(tiny_hf_dir):
    """Two mock servers serving the same tiny Qwen3-MoE; yields their URLs."""
    model = tiny_hf_dir("qwen3_moe")
    ports = [free_port(), free_port()]
    procs = [_start(model, p) for p in ports]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    deadline = time.monotonic() + 120
    for url, proc in zip(urls, procs):
        wait_healthy(url, proc, deadline)
    yield urls
    for proc in procs:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def mock(mock_urls):
    """The servers with faults and request logs cleared."""
    for url in mock_urls:
        httpx.post(url + "/_mock/reset", json={})
    return mock_urls


def inject(url: str, route: str, kind: str, count: int = 1) -> None:
    httpx.post(url + "/_mock/fault", json={"route": route, "kind": kind, "count": count}).raise_for_status()


def request_log(url: str) -> list[str]:
    return httpx.get(url + "/_mock/log").json()["log"]
