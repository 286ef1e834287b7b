"""How a server the job started is restarted: the launcher's processes in this process, or keepers elsewhere.

Both block until the new server answers /health (a one-token generation in SGLang 0.5.23, see health.py) or
raise ServerUnavailableError naming the server and its log.
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import httpx

from grpo_megatron.rollout.sglang.errors import ServerUnavailableError
from grpo_megatron.rollout.sglang.launcher import SGLangServer


def read_states(control_dir: Path) -> dict[str, dict]:
    """The keepers' records (imported here, not at module level: `python -m ...keeper` then runs a fresh module)."""
    from grpo_megatron.rollout.sglang.keeper import read_states as read

    return read(control_dir)


def request_file(control_dir: Path, name: str) -> Path:
    from grpo_megatron.rollout.sglang.keeper import request_file as path

    return path(control_dir, name)


class Restarter(Protocol):
    def owns(self, url: str) -> bool: ...

    def log_path(self, url: str) -> str: ...

    def restart(self, url: str, timeout_s: float) -> None: ...


class LaunchedServers:
    """Servers started by this process through the launcher (SGLangServer)."""

    def __init__(self, servers: Iterable[SGLangServer]):
        self.by_url = {server.spec.url.rstrip("/"): server for server in servers}

    def owns(self, url: str) -> bool:
        return url in self.by_url

    def log_path(self, url: str) -> str:
        return str(self.by_url[url].log_path)

    def restart(self, url: str, timeout_s: float) -> None:
        server = self.by_url[url]
        server.kill()
        server.start()
        server.wait_healthy(timeout_s)


class KeeperServers:
    """Servers run by keepers (grpo_megatron.rollout.sglang.keeper) that write into `control_dir`."""

    def __init__(self, control_dir: str | Path, api_key: str | None = None, ack_timeout_s: float = 60.0):
        self.control_dir, self.ack_timeout_s = Path(control_dir), ack_timeout_s
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def owns(self, url: str) -> bool:
        return url in read_states(self.control_dir)

    def log_path(self, url: str) -> str:
        return read_states(self.control_dir).get(url, {}).get("log", f"(no keeper record for {url})")

    def restart(self, url: str, timeout_s: float) -> None:
        record = read_states(self.control_dir)[url]
        request_file(self.control_dir, record["name"]).write_text(str(time.time()))
        deadline = time.monotonic() + self.ack_timeout_s
        while read_states(self.control_dir).get(url, {}).get("starts", 0) <= record["starts"]:
            if time.monotonic() > deadline:
                raise ServerUnavailableError(f"SGLang server {url}: its keeper did not restart it within "
                                             f"{self.ack_timeout_s:.0f} s (is its step still running?); see "
                                             f"{record['log']}")
            time.sleep(0.2)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            now = read_states(self.control_dir).get(url, {})
            if now.get("exit_code") is not None:
                raise ServerUnavailableError(f"SGLang server {url} exited with code {now['exit_code']} while "
                                             f"restarting; see {record['log']}")
            try:
                if httpx.get(url + "/health", headers=self.headers, timeout=5, trust_env=False).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(1.0)
        raise ServerUnavailableError(f"SGLang server {url} not healthy {timeout_s:.0f} s after its restart "
                                     f"(rollout.sglang.restart_timeout_s); see {record['log']}")
