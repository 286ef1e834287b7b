"""What the Slurm scripts set up for GPU jobs (no Slurm needed): SGLang in its own interpreter (SGLANG_PYTHON),
CUDA_DEVICE_MAX_CONNECTIONS=1, the gloo interface check, and the weight-sync mode of every shipped config."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from grpo_megatron.config import load_config
from tests.slurm.test_launch_flags import HARNESS, REPO

RECORDER = """#!/usr/bin/env bash
echo "$0 $* cuda_connections=${CUDA_DEVICE_MAX_CONNECTIONS:-unset}" >> "$ARGS_DIR/calls"
case "$*" in *"import sglang"*) exit 0 ;; esac
"""


def _script(path: Path) -> str:
    path.write_text(RECORDER)
    path.chmod(0o755)
    return str(path)


def test_servers_and_router_run_with_sglang_python_and_the_trainer_python_runs_neither(tmp_path):
    trainer, sglang = _script(tmp_path / "trainer-python"), _script(tmp_path / "sglang-python")
    (tmp_path / "run" / "slurm").mkdir(parents=True)
    env = {**os.environ, "GRPO_REPO": str(REPO), "PYTHON": trainer, "SGLANG_PYTHON": sglang, "ARGS_DIR": str(tmp_path),
           "SLURM_JOB_ID": "7", "RUN_DIR": str(tmp_path / "run"), "MODEL_HF_PATH": "/models/m", "NPROC_PER_NODE": "2",
           "GRPO_DEVICE_KIND": "gpu", "ROUTING_REPLAY": "none", "GRPO_SGLANG_API_KEY": "k",
           "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    out = subprocess.run(["bash", "-c", HARNESS], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    sglang_calls = [c for c in calls if "sglang" in c.split(" ", 1)[1]]
    assert any("sglang.launch_server" in c for c in sglang_calls) and any("launch_router" in c for c in sglang_calls)
    assert all(c.startswith(sglang + " ") for c in sglang_calls), calls
    server = next(c for c in sglang_calls if "sglang.launch_server" in c)
    assert server.endswith("cuda_connections=unset")  # megatron's setting, kept from SGLang's streams


def _bash(body: str, **env: str) -> subprocess.CompletedProcess:
    script = f'set -euo pipefail; source "{REPO}/slurm/common.sh"; {body}'
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in {**os.environ, **env}.items() if k not in ("GLOO_SOCKET_IFNAME",
                               "CUDA_DEVICE_MAX_CONNECTIONS") or k in env})


LOOPBACK_HOST = 'hostname() { echo node1; }; getent() { echo "127.0.1.1       node1.cluster node1"; }; '
ROUTED_HOST = 'hostname() { echo node1; }; getent() { echo "10.0.0.5        node1"; }; '


def test_gpu_jobs_get_one_cuda_connection_and_cpu_jobs_are_left_alone():
    show = '; echo "max=${CUDA_DEVICE_MAX_CONNECTIONS:-unset}"'
    assert "max=1" in _bash(ROUTED_HOST + "_grpo_runtime_env gpu 10.0.0.5" + show).stdout
    assert "max=unset" in _bash(ROUTED_HOST + "_grpo_runtime_env cpu 10.0.0.5" + show).stdout


TWO_HOSTS = "10.0.0.5 10.0.0.6"


def test_a_hostname_on_loopback_stops_a_multi_node_job_naming_gloo_socket_ifname():
    out = _bash(LOOPBACK_HOST + f"_grpo_runtime_env gpu {TWO_HOSTS}; echo started")
    assert out.returncode == 2 and "started" not in out.stdout
    errors = out.stderr.strip().splitlines()
    assert len(errors) == 1 and "GLOO_SOCKET_IFNAME" in errors[0] and "127.0.1.1" in errors[0]
    assert "started" in _bash(LOOPBACK_HOST + f"_grpo_runtime_env gpu {TWO_HOSTS}; echo started",
                              GLOO_SOCKET_IFNAME="eth0").stdout
    assert "started" in _bash(LOOPBACK_HOST + "_grpo_runtime_env gpu 10.0.0.5; echo started").stdout  # one node
    # nodes simulated on one host (tests/slurm/cluster.py): loopback is where the other ranks are
    assert "started" in _bash(LOOPBACK_HOST + "_grpo_runtime_env cpu 127.0.0.1 127.0.0.1; echo started").stdout
    assert "started" in _bash(ROUTED_HOST + f"_grpo_runtime_env gpu {TWO_HOSTS}; echo started").stdout


def test_sglang_in_the_trainer_environment_on_gpu_is_warned_about(tmp_path):
    python = _script(tmp_path / "python")
    same = _bash("_grpo_sglang_python", PYTHON=python, GRPO_DEVICE_KIND="gpu")
    assert same.returncode == 0 and "SGLANG_PYTHON" in same.stdout
    own = _bash("_grpo_sglang_python", PYTHON=python, SGLANG_PYTHON=_script(tmp_path / "sg"), GRPO_DEVICE_KIND="gpu")
    assert own.returncode == 0 and "WARNING" not in own.stdout
    missing = _bash("_grpo_sglang_python", PYTHON=python, SGLANG_PYTHON="/nonexistent/python")
    assert missing.returncode == 2 and "SGLANG_PYTHON=/nonexistent/python" in missing.stderr


SHIPPED = sorted((REPO / "slurm" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_configs_sync_by_tensor_when_colocated_and_distributed_with_rollout_nodes(config):
    colocated = load_config(config, {"rollout": {"sglang": {"colocated": True}}})
    if colocated.rollout.engine != "sglang":
        return  # embedded rollouts push no weights over the network
    dedicated = load_config(config, {"rollout": {"sglang": {"colocated": False}}})
    assert colocated.rollout.sglang.sync_mode == "tensor" and dedicated.rollout.sglang.sync_mode == "distributed"
    text = config.read_text()
    block = re.search(r"((?:\s*#.*\n)+)\s*weight_sync:", text)
    assert block and "colocated" in block.group(1) and "disk" in block.group(1)  # the reason, in the config
