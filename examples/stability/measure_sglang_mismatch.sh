#!/usr/bin/env bash
# Measure the natural train-vs-rollout mismatch of a model: a real SGLang server (pinned version, CPU) in
# DTYPE serves the rollouts of a short GRPO run (arm cpu_sglang/grpo.yaml) whose trainer computes in float32,
# then the per-step train_rollout/* and rollout_correction/* metrics are summarised.
#
#   examples/stability/measure_sglang_mismatch.sh                                    # the study's tiny MoE, bf16
#   MODEL=runs/stability/sglang_bf16_probe/larger_hf OUT=runs/stability/mismatch/larger examples/stability/measure_sglang_mismatch.sh
#   DTYPE=float16 OUT=runs/stability/mismatch/fp16 examples/stability/measure_sglang_mismatch.sh
#
# Environment: MODEL (an HF checkpoint in the tiny tokenizer's vocabulary; default the study's, made by
# examples/tiny_cpu/prepare.py), DTYPE (default bfloat16), STEPS (RL steps, default 10), OUT, PYTHON.
# Arguments after `--` are extra trainer overrides.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CACHE=${CACHE:-$REPO/examples/tiny_cpu/cache}
MODEL=${MODEL:-$CACHE/tiny_qwen3_moe_hf}
DTYPE=${DTYPE:-bfloat16}
STEPS=${STEPS:-10}
OUT=${OUT:-runs/stability/mismatch/$(basename "$MODEL")_$DTYPE}
PYTHON=${PYTHON:-python}
[[ "${1:-}" == "--" ]] && shift
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

"$PYTHON" "$REPO/examples/tiny_cpu/prepare.py" --cache "$CACHE" --task copy >/dev/null
mkdir -p "$OUT"
port=$("$PYTHON" -c "from grpo_megatron.parallel import free_port; print(free_port())")
"$PYTHON" -m tests.sglang_live.server "$MODEL" --port "$port" --routed-experts --log "$OUT/server.log" \
    --dtype "$DTYPE" >"$OUT/server.out" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 900); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
    kill -0 "$server" 2>/dev/null || { echo "server failed, see $OUT/server.log" >&2; exit 1; }
    sleep 1
done
megatron=()
[[ "$MODEL" == "$CACHE/tiny_qwen3_moe_hf" ]] && megatron=(--model.megatron_path "$CACHE/tiny_qwen3_moe_mcore")
[[ ${#megatron[@]} -eq 0 ]] && megatron=(--model.megatron_path "")  # other models: loaded from the HF checkpoint
"$PYTHON" -m grpo_megatron.train --config "$REPO/examples/stability/cpu_sglang/grpo.yaml" --run_dir "$OUT/run" \
    --model.hf_path "$MODEL" "${megatron[@]}" --data.train_files "$CACHE/copy_train.jsonl" \
    --data.eval_files "$CACHE/copy_eval.jsonl" --rollout.sglang.urls "http://127.0.0.1:$port" \
    --train.steps "$STEPS" --eval.interval 0 "$@" >"$OUT/train.log" 2>&1
"$PYTHON" - "$OUT/run/metrics.jsonl" <<'EOF'
import json, statistics, sys
steps = [r for r in map(json.loads, open(sys.argv[1])) if "train_rollout/k3_kl" in r]
for key in ("train_rollout/k3_kl", "train_rollout/logprob_abs_diff", "train_rollout/ratio_outside_2x",
            "rollout_correction/chi2_token", "rollout_correction/chi2_seq", "rollout_correction/ess_raw",
            "weight_sync/probe_max_abs_diff", "train/entropy", "time/step"):
    values = [r[key] for r in steps if key in r]
    if values:
        print(f"{key:34s} mean {statistics.fmean(values):.3g}  median {statistics.median(values):.3g}  "
              f"max {max(values):.3g}  ({len(values)} steps)")
EOF
