"""The server launcher: the flags it passes for a layout, early failure naming the URL and log, stop by PID group."""
from __future__ import annotations

import os
import sys
import time

import pytest

from grpo_megatron.rollout.sglang.errors import ServerUnavailableError
from grpo_megatron.rollout.sglang.launcher import CPU_FLAGS, RouterSpec, ServerSpec, SGLangServer
from grpo_megatron.parallel import free_port


def test_command_carries_layout_routing_and_auth():
    spec = ServerSpec("/models/m", 30001, tp=4, ep=2, dp=2, routed_experts=True, api_key="k", python="/venv/python",
                      extra_args=["--dtype", "bfloat16"])
    cmd = spec.command()
    assert cmd[:3] == ["/venv/python", "-m", "sglang.launch_server"]
    flags = dict(zip(cmd[3::2], cmd[4::2]))
    assert flags["--model-path"] == "/models/m" and flags["--host"] == "127.0.0.1" and flags["--port"] == "30001"
    assert (flags["--tp-size"], flags["--ep-size"], flags["--dp-size"]) == ("4", "2", "2")
    assert "--enable-return-routed-experts" in cmd and cmd[cmd.index("--api-key") + 1] == "k"
    assert cmd[-2:] == ["--dtype", "bfloat16"]  # extra args last, so they win
    assert not set(CPU_FLAGS) & set(cmd)
    assert spec.url == "http://127.0.0.1:30001"


def test_cpu_command_sizes_the_kv_cache_instead_of_a_tiny_memory_fraction():
    cmd = ServerSpec("/m", 1, cpu=True, cpu_kv_tokens=4096).command()
    assert all(flag in cmd for flag in CPU_FLAGS)
    assert cmd[cmd.index("--max-total-tokens") + 1] == "4096"
    assert float(cmd[cmd.index("--mem-fraction-static") + 1]) >= 0.5
    assert "--enable-return-routed-experts" not in ServerSpec("/m", 1).command()


def test_a_server_that_exits_while_starting_fails_fast_naming_url_and_log(tmp_path):
    # The trainer's own interpreter has no sglang: `python -m sglang.launch_server` exits at once.
    spec = ServerSpec(str(tmp_path), free_port(), python=sys.executable)
    log = tmp_path / "server.log"
    server = SGLangServer(spec, log_path=log, env={"PYTHONPATH": str(tmp_path)}).start()
    started = time.monotonic()
    with pytest.raises(ServerUnavailableError, match=rf"{spec.url}.*exited.*{log.name}"):
        server.wait_healthy(timeout_s=60)
    assert time.monotonic() - started < 30
    assert "sglang" in log.read_text()


def test_stop_ends_the_whole_process_group(tmp_path):
    """SGLang forks scheduler/detokenizer children; stop() must take them down with the launcher process."""
    child_pid_file = tmp_path / "child.pid"
    fake = tmp_path / "sglang" / "launch_server.py"
    fake.parent.mkdir()
    (fake.parent / "__init__.py").write_text("")
    fake.write_text("import subprocess, sys, time\n"
                    f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
                    f"open({str(child_pid_file)!r}, 'w').write(str(child.pid))\n"
                    "time.sleep(600)\n")
    server = SGLangServer(ServerSpec("/m", free_port(), python=sys.executable),
                          env={"PYTHONPATH": str(tmp_path)}).start()
    deadline = time.monotonic() + 30
    while not child_pid_file.exists() or not child_pid_file.read_text():
        assert time.monotonic() < deadline, "fake server did not start its child"
        time.sleep(0.1)
    child = int(child_pid_file.read_text())
    server.stop(grace_s=10)
    assert server.process.poll() is not None
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not yet reaped) counts as gone
        return f.read().split()[2] != "Z"


def test_router_command_lists_every_worker():
    spec = RouterSpec(["http://a:1", "http://b:2"], 30100, policy="round_robin", python="/venv/python")
    cmd = spec.command()
    assert cmd[:3] == ["/venv/python", "-m", "sglang_router.launch_router"]
    workers = cmd[cmd.index("--worker-urls") + 1:cmd.index("--host")]
    assert workers == ["http://a:1", "http://b:2"]
    assert cmd[cmd.index("--policy") + 1] == "round_robin" and spec.url == "http://127.0.0.1:30100"
    with pytest.raises(ValueError, match="worker URL"):
        RouterSpec([], 1).command()


def test_servers_and_routers_run_in_sglang_python_when_set(monkeypatch):
    """SGLang's own environment (its torch pin is not the trainer's): $SGLANG_PYTHON, as for the Slurm scripts."""
    monkeypatch.setenv("SGLANG_PYTHON", "/opt/sglang-venv/bin/python")
    assert ServerSpec("/m", 1).command()[0] == "/opt/sglang-venv/bin/python"
    assert RouterSpec(["http://a:1"], 2).command()[0] == "/opt/sglang-venv/bin/python"
    monkeypatch.delenv("SGLANG_PYTHON")
    assert ServerSpec("/m", 1).command()[0] == "python"
