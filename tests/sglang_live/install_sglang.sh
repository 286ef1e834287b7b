#!/usr/bin/env bash
# Create (idempotently) the cached virtual environment holding the pinned SGLang
# that the live tests in this directory start. Lives outside the repo.
#
#   tests/sglang_live/install_sglang.sh            # install if missing
#   SGLANG_LIVE_VENV=/path tests/sglang_live/install_sglang.sh
#
# Takes ~5 min and ~11 GB the first time (sglang pins a CUDA build of torch,
# which imports fine without a GPU); a no-op afterwards.
set -euo pipefail
SGLANG_VERSION="${SGLANG_VERSION:-0.5.23}"
VENV="${SGLANG_LIVE_VENV:-$HOME/.cache/grpo_megatron/sglang-$SGLANG_VERSION}"
PY="${SGLANG_LIVE_PYTHON:-python3.11}"
STAMP="$VENV/.installed-sglang-$SGLANG_VERSION"

if [[ -f "$STAMP" ]] && "$VENV/bin/python" -c "import sglang, sglang_router, sys; sys.exit(sglang.__version__ != '$SGLANG_VERSION')" 2>/dev/null; then
  echo "sglang $SGLANG_VERSION already installed in $VENV"
  exit 0
fi
mkdir -p "$(dirname "$VENV")"
free_gb=$(( $(df -Pk "$(dirname "$VENV")" | awk 'NR==2 {print $4}') / 1048576 ))
if (( free_gb < 14 )); then
  echo "ERROR: SGLang $SGLANG_VERSION needs ~11 GB (plus pip's temporary files) under $(dirname "$VENV"); only" \
       "${free_gb} GB free. Free space there or point SGLANG_LIVE_VENV at a larger disk." >&2
  exit 1
fi
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
start=$(date +%s)
"$VENV/bin/python" -m pip install "sglang==$SGLANG_VERSION" "sglang-router==${SGLANG_ROUTER_VERSION:-0.3.2}"
"$VENV/bin/python" -c "import sglang; print('sglang', sglang.__version__)"
echo "installed in $(( $(date +%s) - start )) s: $(du -sh "$VENV" | cut -f1)"
touch "$STAMP"
