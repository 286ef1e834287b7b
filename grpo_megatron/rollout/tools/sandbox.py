"""Run untrusted Python (a policy's tool call) in a child process with hard limits, never in the trainer.

The child is `python -I -S` (no site, no user paths, no environment variables) in a fresh empty directory
and its own session; before the code runs, its first lines set resource.setrlimit caps (CPU seconds,
address space, file size 1 MB, 32 open files, no core) and install an audit hook that refuses sockets,
subprocesses, exec, fork, signals, ctypes and raising the limits again (root could), so the code reaches
no network through Python; a wall-clock timeout kills the session's process group. (No preexec_fn: the tool
loop starts sandboxes from threads, where forking with a Python callback can deadlock.) Output is the
child's stdout, then the last line of its stderr (the exception, not the sandbox's own frames), cut to
`max_output_chars`.
"""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

_PRELUDE = r'''
import resource, sys
for _limit, _value in ((resource.RLIMIT_CPU, {cpu_s}), (resource.RLIMIT_AS, {memory_bytes}),
                       (resource.RLIMIT_FSIZE, 1 << 20), (resource.RLIMIT_NOFILE, 32), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(_limit, (_value, _value))
_BLOCKED = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.fork", "os.spawn",
            "ctypes.", "pty.", "os.kill", "signal.", "resource.setrlimit", "resource.prlimit")
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


def run_python(code: str, timeout_s: float = 5.0, memory_mb: int = 256, max_output_chars: int = 4096) -> SandboxResult:
    """Execute `code` in the sandbox and return what it printed; never raises for anything the code does."""
    with tempfile.TemporaryDirectory(prefix="tool_sandbox_") as workdir:
        prelude = _PRELUDE.replace("{cpu_s}", str(max(1, math.ceil(timeout_s)))).replace(
            "{memory_bytes}", str(memory_mb << 20))
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", prelude], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, cwd=workdir, env={}, start_new_session=True, text=True, errors="replace")
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
