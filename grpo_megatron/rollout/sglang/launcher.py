"""Starting and stopping `python -m sglang.launch_server` processes for a model and parallel layout.

SGLang lives in its own environment (its torch pin differs from the trainer's), so `python` is that
environment's interpreter: $SGLANG_PYTHON when set (as for the Slurm scripts), else `python`. Stopping is by the PID we started (the process group it leads), never by name.
"""
from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from grpo_megatron.rollout.sglang.errors import ServerUnavailableError
from grpo_megatron.rollout.sglang.keeper import kill_process_group, stop_process_group

# What SGLang needs to run on a CPU without a GPU kernel library (cpu-platform-facts.md, "SGLang on CPU").
CPU_FLAGS = ["--device", "cpu", "--attention-backend", "torch_native", "--sampling-backend", "pytorch",
             "--disable-cuda-graph", "--skip-server-warmup"]
# On CPU SGLang sizes its KV cache from *free host memory* at load time: a small --mem-fraction-static (0.05)
# failed to start ("no memory for the KV cache") whenever other processes held memory. A generous fraction with a
# fixed KV size (cpu_kv_tokens) starts reliably and uses a predictable amount.
CPU_MEMORY_FRACTION = "0.6"


def sglang_python() -> str:
    """SGLang's interpreter: $SGLANG_PYTHON, else `python` on PATH."""
    return os.environ.get("SGLANG_PYTHON") or "python"


class _LaunchSpec:
    """What a server's and a router's command share: their address, the API key and the user's extra args."""

    host: str
    port: int
    api_key: str | None
    extra_args: list[str]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _with_auth_and_extras(self, cmd: list[str]) -> list[str]:
        """`cmd` + --api-key (if set) + the extra args, last so that they win."""
        if self.api_key:
            cmd = cmd + ["--api-key", self.api_key]
        return cmd + list(self.extra_args)


@dataclass
class ServerSpec(_LaunchSpec):
    model_path: str
    port: int
    host: str = "127.0.0.1"
    tp: int = 1
    ep: int = 1
    dp: int = 1
    routed_experts: bool = False  # R3: return the experts each token was routed to
    api_key: str | None = None
    cpu: bool = False
    cpu_kv_tokens: int = 32768  # CPU only: --max-total-tokens, the KV cache size in tokens
    extra_args: list[str] = field(default_factory=list)
    python: str = field(default_factory=sglang_python)

    def command(self) -> list[str]:
        cmd = [self.python, "-m", "sglang.launch_server", "--model-path", str(self.model_path),
               "--host", self.host, "--port", str(self.port),
               "--tp-size", str(self.tp), "--ep-size", str(self.ep), "--dp-size", str(self.dp)]
        if self.routed_experts:
            cmd.append("--enable-return-routed-experts")
        if self.cpu:
            cmd += [*CPU_FLAGS, "--mem-fraction-static", CPU_MEMORY_FRACTION,
                    "--max-total-tokens", str(self.cpu_kv_tokens)]
        return self._with_auth_and_extras(cmd)


@dataclass
class RouterSpec(_LaunchSpec):
    """`python -m sglang_router.launch_router` in front of worker servers (package sglang-router).

    Only /generate should go through it (rollout.sglang.router_url); weights are pushed to each worker directly.
    """
    worker_urls: list[str]
    port: int
    host: str = "127.0.0.1"
    policy: str = "cache_aware"  # random | round_robin | cache_aware | power_of_two
    api_key: str | None = None
    extra_args: list[str] = field(default_factory=list)
    python: str = field(default_factory=sglang_python)

    def command(self) -> list[str]:
        if not self.worker_urls:
            raise ValueError("RouterSpec needs at least one worker URL")
        cmd = [self.python, "-m", "sglang_router.launch_router", "--worker-urls", *self.worker_urls,
               "--host", self.host, "--port", str(self.port), "--policy", self.policy]
        return self._with_auth_and_extras(cmd)


class SGLangServer:
    """One server (or router) process: start() launches it, wait_healthy() polls /health, stop() ends it by PID."""

    def __init__(self, spec: ServerSpec | RouterSpec, log_path: str | Path | None = None, env: dict[str, str] | None = None):
        self.spec, self.log_path, self.env = spec, log_path, env
        self.process: subprocess.Popen | None = None

    def start(self) -> SGLangServer:
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(self.spec.command(), stdout=log, stderr=subprocess.STDOUT,
                                        env={**os.environ, **(self.env or {})}, start_new_session=True)
        return self

    def wait_healthy(self, timeout_s: float = 600.0) -> None:
        """Poll GET /health until 200; fail early if the process exits, naming the URL and the log."""
        deadline = time.monotonic() + timeout_s
        headers = {"Authorization": f"Bearer {self.spec.api_key}"} if self.spec.api_key else {}
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ServerUnavailableError(f"SGLang server {self.spec.url} exited with code "
                                             f"{self.process.returncode} while starting; see {self.log_path}")
            try:
                if httpx.get(self.spec.url + "/health", headers=headers, timeout=5, trust_env=False).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(1.0)
        raise ServerUnavailableError(f"SGLang server {self.spec.url} not healthy after {timeout_s:.0f}s; "
                                     f"see {self.log_path}")

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM the server's process group (it forks scheduler/detokenizer children), SIGKILL after grace_s."""
        if self.process is not None:
            stop_process_group(self.process, grace_s)

    def kill(self) -> None:
        """SIGKILL the process group at once (a restart of a dead or hung server: SIGKILL ends a stopped one too)."""
        if self.process is not None:
            kill_process_group(self.process)
