#!/usr/bin/env bash
# First run on one GPU, offline: a bare Python 3.12 venv gets the prebuilt wheels (the project's wheel and its
# dependencies from scripts/build_wheelhouse.sh; TransformerEngine too when its wheels are in the directory), then
#  1. the GPU checks (python -m grpo_megatron.smoke): bf16 SFT warm start kept by the first RL step with megatron's
#     mixed-precision and distributed optimizers, seeded groups at temperature 1 not G copies of one response,
#     one RL step with rollout routing replay (R3);
#  2. the tiny example in bf16 (rollouts by the embedded engine on the GPU): held-out accuracy before/after, time
#     per phase, peak GPU memory and the train-vs-engine log-prob gap.
#
#   bash scripts/gpu_smoke.sh WHEEL_DIR       (no network used)
#
# PYTHON (default python3.12) makes the venv; VENV (default a temp dir) is where. torch comes from WHEEL_DIR when a
# torch wheel is there; otherwise the venv sees the system's CUDA torch (--system-site-packages) and nothing else
# of it is used. Ten minutes at most. GRPO_SMOKE_ALLOW_CPU=1 runs the same path without a GPU, to check the script.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
wheels=${1:?usage: scripts/gpu_smoke.sh WHEEL_DIR (made by scripts/build_wheelhouse.sh)}
PYTHON=${PYTHON:-python3.12}
fail() { echo "error: $*" >&2; exit 2; }
[[ -d "$wheels" ]] || fail "$wheels is not a directory: build it with scripts/build_wheelhouse.sh on a networked machine"
wheels=$(cd "$wheels" && pwd)
project=$(ls "$wheels"/grpo_megatron-*.whl 2>/dev/null | head -n1) || true
[[ -n "$project" ]] || fail "no grpo_megatron-*.whl in $wheels: build it with scripts/build_wheelhouse.sh"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' \
    || fail "$PYTHON is not Python 3.12 (the wheels' target): set PYTHON"
start=$(date +%s)
venv=${VENV:-$(mktemp -d)/venv}
if ls "$wheels"/torch-*.whl >/dev/null 2>&1; then
    "$PYTHON" -m venv "$venv"
else
    echo "no torch wheel in $wheels: the venv uses the system's torch"
    "$PYTHON" -m venv --system-site-packages "$venv"
fi
py=$venv/bin/python
install=("$py" -m pip install -q --no-index --find-links "$wheels")
"${install[@]}" "$project[cluster]"
if ls "$wheels"/transformer_engine*.whl >/dev/null 2>&1; then
    "${install[@]}" "$wheels"/transformer_engine*.whl
    "$py" -c 'import transformer_engine.pytorch' || fail "TransformerEngine's wheel installed but does not import"
    echo "TransformerEngine: installed from $wheels"
else
    echo "TransformerEngine: no wheel in $wheels (megatron's local layer spec is used)"
fi
echo "install: $(( $(date +%s) - start )) s"

cpu_flag=()
if ! "$py" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
    [[ "${GRPO_SMOKE_ALLOW_CPU:-0}" == 1 ]] || fail "the venv's torch sees no GPU (CUDA build and a visible device needed)"
    echo "no GPU: GRPO_SMOKE_ALLOW_CPU=1, running on the CPU"
    cpu_flag=(--allow-cpu)
fi
unset PYTHONPATH
(cd / && "$py" -c 'import grpo_megatron, sys; p = grpo_megatron.__file__; print("grpo_megatron from", p); sys.exit(not p.startswith(sys.prefix))') \
    || fail "grpo_megatron is not the installed wheel's"
"$py" -c 'from grpo_megatron.platform import detect; p = detect(); print(f"platform: {p.device_type}, TE {p.has_transformer_engine}, apex {p.has_apex}")'

work=$(mktemp -d)
mem_log=$work/gpu_mem
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$mem_log" &
    sampler=$!
    trap 'kill $sampler 2>/dev/null || true' EXIT
fi
# 1. the checks, from the installed package (run outside the repository so that its sources are not imported)
(cd "$work" && timeout 300 "$py" -m grpo_megatron.smoke "$work/checks" "${cpu_flag[@]}")
# 2. the example: its scripts live in the repository, the package it runs is the venv's (started outside the repository)
(cd "$work" && timeout 600 "$py" "$repo/examples/tiny_cpu/run.py" --quick --run-dir "$work/run" --cache "$work/cache" \
    --model.dtype bfloat16 --logging.progress_bar false)
"$py" - "$work/run/metrics.jsonl" "$mem_log" <<'PY'
import json, os, sys
records = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
gaps = [r["train_rollout/logprob_abs_diff"] for r in records if "train_rollout/logprob_abs_diff" in r]
print(f"train-vs-engine |dlogprob| per token: " + (f"mean {sum(gaps) / len(gaps):.4f}, max {max(gaps):.4f}" if gaps else "not logged"))
if os.path.exists(sys.argv[2]):
    used = [int(v) for v in open(sys.argv[2]).read().split() if v.isdigit()]
    print(f"peak GPU memory (nvidia-smi, whole device): {max(used, default=0)} MiB")
PY
echo "gpu smoke: $(( $(date +%s) - start )) s in all"
