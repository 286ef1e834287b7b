#!/usr/bin/env bash
# A second CPU venv with megatron-core 0.19.2, the newest release this project is tested on.
# 0.19 requires Python >= 3.12 in its metadata but runs on 3.11; it is built from its sdist (its C++
# helper compiles here) and its MoE code imports triton at module load, so triton comes first.
# Usage: bash scripts/install_megatron_019.sh [VENV_DIR]   (default .venv019)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv019}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q -r requirements-cpu.txt -r requirements-test.txt
"$VENV/bin/python" -m pip install -q "numpy<2.5" triton
NO_VCS_VERSION=1 "$VENV/bin/python" -m pip install -q --no-deps --ignore-requires-python megatron-core==0.19.2
"$VENV/bin/python" -m pip install -q --no-deps -e .
# The installed distribution's version: megatron.core.__version__ appends the short commit of whatever git
# checkout holds the venv (package_info.py runs `git rev-parse` beside itself), so inside this repo it reads
# 0.19.2+<our commit>.
"$VENV/bin/python" -c "from importlib.metadata import version; v = version('megatron-core'); assert v == '0.19.2', v; print('installed megatron-core', v, 'into $VENV')"
