#!/usr/bin/env bash
# First run on one GPU: install this project's dependencies offline, run the tiny example in bf16 on the GPU,
# print held-out accuracy before/after, time per phase, peak GPU memory and the train-vs-engine log-prob gap.
#
#   bash scripts/gpu_smoke.sh WHEEL_DIR       (WHEEL_DIR from scripts/build_wheelhouse.sh; no network used)
#
# Needs a Python (PYTHON, default python3) with a CUDA build of torch. Ten minutes at most.
# GRPO_SMOKE_ALLOW_CPU=1 runs the same path without a GPU (bf16 on CPU), to check the script itself.
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=${1:?usage: scripts/gpu_smoke.sh WHEEL_DIR (made by scripts/build_wheelhouse.sh)}
PYTHON=${PYTHON:-python3}
fail() { echo "error: $*" >&2; exit 2; }
[[ -d "$wheels" ]] || fail "$wheels is not a directory: build it with scripts/build_wheelhouse.sh on a networked machine"
if ! "$PYTHON" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
    [[ "${GRPO_SMOKE_ALLOW_CPU:-0}" == 1 ]] || fail "$PYTHON has no CUDA torch (or no GPU is visible); set PYTHON"
    echo "no GPU: GRPO_SMOKE_ALLOW_CPU=1, running on the CPU"
fi
start=$(date +%s)
"$PYTHON" -m pip install -q --no-index --find-links "$wheels" --no-build-isolation ".[cluster]" \
    -c requirements-tested.txt
echo "install: $(( $(date +%s) - start )) s"

run_dir=$(mktemp -d)/run
mem_log=$run_dir.gpu_mem
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$mem_log" &
    sampler=$!
    trap 'kill $sampler 2>/dev/null || true' EXIT
fi
timeout 600 "$PYTHON" examples/tiny_cpu/run.py --quick --run-dir "$run_dir" --model.dtype bfloat16 \
    --logging.progress_bar false
"$PYTHON" - "$run_dir/metrics.jsonl" "$mem_log" <<'PY'
import json, os, sys
records = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
gaps = [r["train_rollout/logprob_abs_diff"] for r in records if "train_rollout/logprob_abs_diff" in r]
print(f"train-vs-engine |dlogprob| per token: " + (f"mean {sum(gaps) / len(gaps):.4f}, max {max(gaps):.4f}" if gaps else "not logged"))
if os.path.exists(sys.argv[2]):
    used = [int(v) for v in open(sys.argv[2]).read().split() if v.isdigit()]
    print(f"peak GPU memory (nvidia-smi, whole device): {max(used, default=0)} MiB")
PY
echo "gpu smoke: $(( $(date +%s) - start )) s in all"
