"""Run untrusted Python (a policy's tool call) in a child process with hard limits, never in the trainer.

The child is `python -I -S` (no site, no user paths, no environment variables) in a fresh empty directory,
with resource.setrlimit caps set before exec: CPU seconds, address space (memory), file size (no writes
beyond 1 MB), open files, and no new processes; a wall-clock timeout kills its process group. Network:
an audit hook installed before the code runs refuses socket creation/connection, subprocesses, exec,
fork and ctypes (Python-level, so code cannot reach the network through the standard library). Output
is the child's stdout, then the last line of its stderr (the exception, not the sandbox's own frames), cut
to `max_output_chars`.
"""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

_PRELUDE = r'''
import sys
_BLOCKED = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.fork", "os.spawn",
            "ctypes.", "pty.", "os.kill", "signal.")
def _refuse(event, args):
    if event.startswith(_BLOCKED):
        raise PermissionError(f"sandbox: {event} is not allowed")
sys.addaudithook(_refuse)
del _refuse
_code = sys.stdin.read()
exec(compile(_code, "<tool>", "exec"), {"__name__": "__main__"})
'''


@dataclass
class SandboxResult:
    output: str  # stdout, then the last stderr line, cut to max_output_chars
    ok: bool  # exit status 0 within the limits
    error: str | None = None  # why not ok: "timed out after 2.0 s", "exit status 1", "killed by SIGKILL"


def _limits(cpu_s: int, memory_mb: int):
    def apply() -> None:
        os.setsid()  # own process group: the timeout kills everything it started
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply


def run_python(code: str, timeout_s: float = 5.0, memory_mb: int = 256, max_output_chars: int = 4096) -> SandboxResult:
    """Execute `code` in the sandbox and return what it printed; never raises for anything the code does."""
    with tempfile.TemporaryDirectory(prefix="tool_sandbox_") as workdir:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _PRELUDE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, cwd=workdir, env={}, preexec_fn=_limits(max(1, int(timeout_s + 0.999)), memory_mb),
            text=True, errors="replace")
        try:
            out, err = proc.communicate(code, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return SandboxResult("", False, f"timed out after {timeout_s:.1f} s")
    last_error = err.strip().splitlines()[-1] if err.strip() else ""
    text = (out + last_error)[:max_output_chars]
    if proc.returncode == 0:
        return SandboxResult(text, True)
    if proc.returncode < 0:
        return SandboxResult(text, False, f"killed by {signal.Signals(-proc.returncode).name}")
    return SandboxResult(text, False, f"exit status {proc.returncode}")
