#!/usr/bin/env bash
# The CPU stability study in one command: every arm (GRPO, GRPO+R2, GRPO+R3, GSPO) for every seed on the
# tiny MoE copy task, then tools/compare_runs.py over all runs.
#
#   examples/stability/run_cpu_study.sh                      # 4 arms x seeds 1 2, one run at a time
#   SEEDS="1 2 3" JOBS=2 examples/stability/run_cpu_study.sh # 3 seeds, two runs at once
#   ARMS="grpo gspo" STEPS=40 examples/stability/run_cpu_study.sh -- --train.lr 1e-3
#
# Environment: ARMS, SEEDS, JOBS (concurrent runs), STEPS (overrides train.steps), OUT (default
# runs/stability/cpu), CACHE (model/data cache, default examples/tiny_cpu/cache), PYTHON.
# Arguments after `--` are extra trainer overrides for every run. Each run is logged to OUT/ARM/seedN.log.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE="$REPO/examples/stability"
ARMS=${ARMS:-"grpo grpo_r2 grpo_r3 gspo"}
SEEDS=${SEEDS:-"1 2"}
JOBS=${JOBS:-1}
OUT=${OUT:-runs/stability/cpu}
CACHE=${CACHE:-$REPO/examples/tiny_cpu/cache}
PYTHON=${PYTHON:-python}
[[ "${1:-}" == "--" ]] && shift
EXTRA=("$@")
[[ -n "${STEPS:-}" ]] && EXTRA+=(--train.steps "$STEPS")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

"$PYTHON" "$REPO/examples/tiny_cpu/prepare.py" --cache "$CACHE" --task copy

run_arm() {  # ARM SEED
    local dir="$OUT/$1/seed$2"
    mkdir -p "$dir"
    echo "[study] $1 seed $2 -> $dir"
    "$PYTHON" -m grpo_megatron.train --config "$HERE/cpu/$1.yaml" --run_dir "$dir" --train.seed "$2" \
        --model.hf_path "$CACHE/tiny_qwen3_moe_hf" --model.megatron_path "$CACHE/tiny_qwen3_moe_mcore" \
        --data.train_files "$CACHE/copy_train.jsonl" --data.eval_files "$CACHE/copy_eval.jsonl" \
        "${EXTRA[@]}" >"$dir.log" 2>&1 || { echo "[study] $1 seed $2 FAILED, see $dir.log" >&2; return 1; }
}

dirs=() failed=0
for seed in $SEEDS; do
    for arm in $ARMS; do
        while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n || failed=1; done
        run_arm "$arm" "$seed" &
        dirs+=("$OUT/$arm/seed$seed")
    done
done
while (( $(jobs -rp | wc -l) > 0 )); do wait -n || failed=1; done
(( failed )) && echo "[study] some runs failed; comparing those that wrote metrics" >&2

present=()
for dir in "${dirs[@]}"; do [[ -s "$dir/metrics.jsonl" ]] && present+=("$dir"); done
"$PYTHON" "$REPO/tools/compare_runs.py" "${present[@]}" --output "$OUT/compare"
exit "$failed"
