#!/usr/bin/env bash
# Install grpo_megatron from scratch the way a GPU cluster does, and import everything its code imports.
#
#   bash scripts/check_install.sh [VENV_DIR]      (default: a temporary directory, removed afterwards)
#
# A fresh venv without the system's site-packages; torch first (TORCH_SPEC, default the CPU CI pin; a GPU
# cluster's venv brings its own CUDA build), then `pip install ".[cluster]" -c requirements-tested.txt`
# (non-editable), then scripts/check_imports.py from outside the source tree, then `pip check`. The `gpu`
# extra (TransformerEngine) is left out: it builds against CUDA. Needs the network (or PIP_FIND_LINKS with
# every wheel and PIP_NO_INDEX=1); run by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
tmp=""
if [[ -n "${1:-}" ]]; then
    venv=$1
else
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    venv=$tmp/venv
fi
start=$(date +%s)
"$PYTHON" -m venv --clear "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
"$venv/bin/python" -m pip install -q "$repo[cluster]" -c "$repo/requirements-tested.txt"
cd "$(mktemp -d)"  # not the repository: the installed copy must be the one imported
"$venv/bin/python" "$repo/scripts/check_imports.py"
"$venv/bin/python" -m pip check
echo "fresh install of .[cluster] imports everything ($(( $(date +%s) - start )) s)"
