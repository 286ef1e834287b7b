"""Fixtures for the tests against a REAL SGLang server (pinned version, CPU, cached venv outside the repo).

These tests are marked `sglang_live`. They run only when the cached venv exists
(tests/sglang_live/install_sglang.sh makes it, ~10 min / 11 GB once) and they were asked for
(`pytest -m sglang_live tests/sglang_live` or GRPO_SGLANG_LIVE=1); otherwise they are deselected.
Asked for without the venv, collection stops with the install command.
Each server takes ~45 s to start on 2 cores.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from grpo_megatron.parallel import free_port
from tests.sglang_live.server import INSTALL_HINT, SGLANG_VERSION, start_server, venv_ready

DTYPE = "bfloat16"  # what the server computes in (--dtype); log-prob tolerances below are for bf16


def pytest_configure(config):
    config.addinivalue_line("markers", "sglang_live: against a real SGLang server on CPU (needs the cached venv "
                                       "from tests/sglang_live/install_sglang.sh)")


def _selected(config) -> bool:
    return os.environ.get("GRPO_SGLANG_LIVE") == "1" or "sglang_live" in (config.getoption("-m") or "")


def pytest_collection_modifyitems(config, items):
    """Unasked-for, the live tests are deselected (they start servers); asked-for without the venv is an error."""
    here = Path(__file__).resolve().parent
    mine = [item for item in items if here in Path(str(item.fspath)).resolve().parents]
    if not mine:
        return
    if not _selected(config):
        items[:] = [item for item in items if item not in mine]
        config.hook.pytest_deselected(items=mine)
        return
    if not venv_ready():
        raise pytest.UsageError(f"no SGLang {SGLANG_VERSION} venv for the sglang_live tests: {INSTALL_HINT}")
    for item in mine:
        item.add_marker(pytest.mark.sglang_live)


@pytest.fixture(scope="session")
def live_model(tiny_hf_dir) -> Path:
    return tiny_hf_dir("qwen3_moe")


@pytest.fixture(scope="session")
def live_logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sglang_logs")


def launch(model_dir: Path, logs: Path, name: str):
    """A real SGLang server on the tiny model with routed experts on; returns (server, log path)."""
    log = logs / f"{name}.log"
    server = start_server(model_dir, free_port(), log, routed_experts=True, extra_args=["--dtype", DTYPE])
    return server, log


@pytest.fixture(scope="session")
def live_server(live_model, live_logs):
    """One real server for the session (weight-sync tests restore the original weights after themselves)."""
    server, log = launch(live_model, live_logs, "main")
    yield server
    server.stop()
    print(f"\nSGLang server log: {log}")
