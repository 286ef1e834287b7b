#!/usr/bin/env bash
# Install grpo_megatron into ./.venv on a CPU-only machine (Python 3.11, torch CPU build).
# Usage: bash scripts/install_cpu.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
"$PYTHON" -c 'import sys; assert sys.version_info[:2] >= (3, 10), "Python >= 3.10 required"'
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first and pinned, so nothing later pulls a multi-GB CUDA build.
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q -r requirements-cpu.txt -r requirements-test.txt
"$VENV/bin/python" -m pip install -q --no-deps -e .
echo "installed into $VENV"
