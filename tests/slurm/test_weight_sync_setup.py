"""What slurm/common.sh and slurm/preflight.py set up for the weight sync (no Slurm needed): the memory saver on
colocated GPU servers, the disk directory defaulting to RUN_DIR/weights with a marker, and the check that every
server node sees it."""
from __future__ import annotations

import os
import subprocess
import sys

import yaml

from tests.slurm.test_launch_flags import REPO, start_servers


def test_colocated_gpu_servers_start_with_the_memory_saver(tmp_path):
    server, _ = start_servers(tmp_path, "gpu", "none")
    assert "--enable-memory-saver" in server
    assert server[server.index("--mem-fraction-static") + 1] == "0.5"


def test_dedicated_or_cpu_servers_keep_their_memory(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
    assert "--enable-memory-saver" not in start_servers(tmp_path / "a", "gpu", "none", ROLLOUT_NODES="1")[0]
    assert "--enable-memory-saver" not in start_servers(tmp_path / "b", "cpu", "none")[0]


def test_preflight_puts_disk_weights_under_the_run_dir_and_leaves_a_marker(tmp_path, tiny_hf_dir):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1", "answer": "1"}\n')
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": {"hf_path": str(tiny_hf_dir("qwen3_moe"))},
                                      "data": {"train_files": [str(data)]},
                                      "reward": {"functions": [{"name": "exact_match"}]},
                                      "rollout": {"engine": "sglang", "sglang": {"weight_sync": "disk"}}}))
    out = subprocess.run([sys.executable, "slurm/preflight.py", "--config", str(config), "--world-size", "1",
                          "--run-dir", str(tmp_path / "run"), "--job-id", "9"], cwd=REPO, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert out.returncode == 0, out.stderr
    values = dict(line.split("=", 1) for line in out.stdout.split())
    weights = tmp_path / "run" / "weights"
    assert values["WEIGHTS_MARKER"] == str(weights / ".visible-9") and (weights / ".visible-9").is_file()
    resolved = yaml.safe_load((tmp_path / "run" / "slurm" / "job-9.yaml").read_text())
    assert resolved["rollout"]["sglang"]["disk_dir"] == str(weights)


def _check_shared_dir(marker: str) -> subprocess.CompletedProcess:
    script = f"""
        set -euo pipefail
        source "{REPO}/slurm/common.sh"
        srun() {{ while [[ "$1" == --* ]]; do shift; done; "$@"; }}  # each "node" is this host
        _grpo_check_shared_dir "{marker}" n1 n2
        echo visible
    """
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)


def test_a_weights_dir_the_server_nodes_cannot_see_stops_the_job(tmp_path):
    marker = tmp_path / ".visible-9"
    missing = _check_shared_dir(str(marker))
    assert missing.returncode != 0 and "not visible from every server node (n1,n2)" in missing.stderr
    marker.write_text("x")
    assert _check_shared_dir(str(marker)).stdout.strip() == "visible"
