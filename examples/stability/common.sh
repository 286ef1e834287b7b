# Sourced by the stability-study scripts (`source common.sh "$@"`): what every study shares. The sourcing
# script sets its own defaults (ARMS, SEEDS, JOBS, OUT) first; this file adds the repository paths, CACHE and
# PYTHON defaults, the extra trainer arguments (after `--`, plus STEPS), the thread/path environment, the
# task data, one training run (study_train) and the final comparison (study_compare).

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE="$REPO/examples/stability"
CACHE=${CACHE:-$REPO/examples/tiny_cpu/cache}
PYTHON=${PYTHON:-python}
[[ "${1:-}" == "--" ]] && shift
EXTRA=("$@")
[[ -n "${STEPS:-}" ]] && EXTRA+=(--train.steps "$STEPS")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

"$PYTHON" "$REPO/examples/tiny_cpu/prepare.py" --cache "$CACHE" --task copy

study_train() {  # CONFIG_DIR ARM SEED [trainer arguments...]: one run of HERE/CONFIG_DIR/ARM.yaml, logged to OUT/ARM/seedSEED.log
    local configs=$1 arm=$2 seed=$3 dir="$OUT/$2/seed$3"
    shift 3
    mkdir -p "$dir"
    echo "[study] $arm seed $seed -> $dir"
    "$PYTHON" -m grpo_megatron.train --config "$HERE/$configs/$arm.yaml" --run_dir "$dir" --train.seed "$seed" \
        --model.hf_path "$CACHE/tiny_qwen3_moe_hf" --model.megatron_path "$CACHE/tiny_qwen3_moe_mcore" \
        --data.train_files "$CACHE/copy_train.jsonl" --data.eval_files "$CACHE/copy_eval.jsonl" \
        "$@" "${EXTRA[@]}" >"$dir.log" 2>&1 || { echo "[study] $arm seed $seed FAILED, see $dir.log" >&2; return 1; }
}

study_compare() {  # FAILED DIR...: tools/compare_runs.py over the runs that wrote metrics; exits with FAILED
    local failed=$1 dir present=()
    shift
    (( failed )) && echo "[study] some runs failed; comparing those that wrote metrics" >&2
    for dir in "$@"; do [[ -s "$dir/metrics.jsonl" ]] && present+=("$dir"); done
    "$PYTHON" "$REPO/tools/compare_runs.py" "${present[@]}" --output "$OUT/compare"
    exit "$failed"
}
