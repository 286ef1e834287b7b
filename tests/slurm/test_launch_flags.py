"""What slurm/common.sh hands the SGLang servers, the router and the trainer (no Slurm needed).

`_grpo_start_sglang` runs with `srun` replaced by a function that runs the step's command here and PYTHON
replaced by a script that records its arguments, so the test sees the exact server and router command
lines: R3's --enable-return-routed-experts, --enable-deterministic-inference on GPU, and the job's API key.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from grpo_megatron.config import API_KEY_ENV, load_config, to_dict

REPO = Path(__file__).resolve().parents[2]
FAKE_PYTHON = """#!/usr/bin/env bash
case "$*" in
    *"import sglang"*) exit 0 ;;
    *sglang.launch_server*) printf '%s\\n' "$@" > "$ARGS_DIR/server.args" ;;
    *sglang_router.launch_router*) printf '%s\\n' "$@" > "$ARGS_DIR/router.args" ;;
esac
"""
HARNESS = """
set -euo pipefail
source "$GRPO_REPO/slurm/common.sh"
srun() { while [[ "$1" == --* ]]; do shift; done; "$@"; }
_grpo_wait_health() { :; }
_grpo_node_addr() { echo "$1"; }
_grpo_start_sglang n1
wait
echo "URLS=$SGLANG_URLS ROUTER=$SGLANG_ROUTER_URL"
"""


def start_servers(tmp_path: Path, device: str, replay: str, **env: str) -> tuple[list[str], list[str]]:
    """Run _grpo_start_sglang for one node; the server's and the router's argument lists."""
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    (tmp_path / "run" / "slurm").mkdir(parents=True)
    full_env = {**os.environ, "GRPO_REPO": str(REPO), "PYTHON": str(python), "ARGS_DIR": str(tmp_path),
                "SLURM_JOB_ID": "7", "RUN_DIR": str(tmp_path / "run"), "MODEL_HF_PATH": "/models/m",
                "NPROC_PER_NODE": "2", "GRPO_DEVICE_KIND": device, "ROUTING_REPLAY": replay,
                "GRPO_SGLANG_API_KEY": "k3y", **env}
    out = subprocess.run(["bash", "-c", HARNESS], env=full_env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "URLS=http://n1:" in out.stdout, out.stdout
    return ((tmp_path / "server.args").read_text().split("\n"), (tmp_path / "router.args").read_text().split("\n"))


def test_r3_on_gpu_gets_routed_experts_deterministic_sampling_and_the_key(tmp_path):
    server, router = start_servers(tmp_path, "gpu", "r3")
    assert "--enable-return-routed-experts" in server
    assert "--enable-deterministic-inference" in server
    assert server[server.index("--api-key") + 1] == "k3y"
    assert server[server.index("--tp-size") + 1] == "2"
    assert router[router.index("--api-key") + 1] == "k3y"


def test_cpu_without_replay_gets_neither_flag_but_still_the_key(tmp_path):
    server, _ = start_servers(tmp_path, "cpu", "none", SGLANG_ARGS="--mem-fraction-static 0.4")
    assert "--enable-return-routed-experts" not in server
    assert "--enable-deterministic-inference" not in server
    assert server[server.index("--api-key") + 1] == "k3y"
    assert server[-3:-1] == ["--mem-fraction-static", "0.4"]


def test_deterministic_inference_can_be_turned_off_on_gpu(tmp_path):
    server, _ = start_servers(tmp_path, "gpu", "r2", SGLANG_DETERMINISTIC="0")
    assert "--enable-deterministic-inference" not in server
    assert "--enable-return-routed-experts" not in server


def test_each_server_runs_under_a_keeper_that_the_trainer_can_ask_for_restarts(tmp_path):
    """The step's command is the keeper (by path, stdlib only) with the job's control directory, then the server."""
    server, _ = start_servers(tmp_path, "cpu", "none")
    assert server[0] == str(REPO / "grpo_megatron/rollout/sglang/keeper.py")
    control = server[server.index("--dir") + 1]
    assert control == str(tmp_path / "run/slurm/sglang-servers-7.0") and Path(control).is_dir()
    assert server[server.index("--name") + 1] == "n1" and server[server.index("--url") + 1].startswith("http://n1:")
    assert server[server.index("--log") + 1] == str(tmp_path / "run/slurm/sglang-7-n1.log")
    assert server[server.index("--") + 2:server.index("--") + 4] == ["-m", "sglang.launch_server"]


def test_each_job_draws_a_fresh_key():
    cmd = f'source "{REPO}/slurm/common.sh"; _grpo_api_key; echo; _grpo_api_key'
    keys = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, check=True).stdout.split()
    assert len(keys) == 2 and keys[0] != keys[1]
    assert all(len(k) == 48 and int(k, 16) >= 0 for k in keys)


@pytest.fixture
def minimal_config(tmp_path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text("model: {hf_path: /m}\ndata: {train_files: [/d.jsonl]}\nreward: {functions: [{name: exact_match}]}\n")
    return path


def test_trainer_takes_the_key_from_the_environment_and_never_writes_it(minimal_config, monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "s3cret")
    cfg = load_config(minimal_config)
    assert cfg.rollout.sglang.api_key == "s3cret"
    assert to_dict(cfg)["rollout"]["sglang"]["api_key"] is None
    assert "s3cret" not in str(to_dict(cfg))


def test_a_key_in_the_config_wins_and_is_kept(minimal_config, monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    cfg = load_config(minimal_config, ["--rollout.sglang.api_key", "from-config"])
    assert cfg.rollout.sglang.api_key == "from-config"
    assert to_dict(cfg)["rollout"]["sglang"]["api_key"] == "from-config"
