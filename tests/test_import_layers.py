"""The package's layers, acyclic modules, rollout/'s groups and the engine interface (training/ never imports
rollout.sglang) as drawn in .importlinter (import-linter reads the imports, runs nothing)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.multiprocess  # import-linter in its own interpreter
def test_the_import_layers_hold_and_no_package_has_a_cycle():
    run = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                          "sys.exit(lint_imports_command(['--no-cache', '--config', '.importlinter']))"],
                         cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-4000:]
    assert "4 kept, 0 broken" in run.stdout, run.stdout[-4000:]
