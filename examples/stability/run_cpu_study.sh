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

ARMS=${ARMS:-"grpo grpo_r2 grpo_r3 gspo"}
SEEDS=${SEEDS:-"1 2"}
JOBS=${JOBS:-1}
OUT=${OUT:-runs/stability/cpu}
# shellcheck source=examples/stability/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" "$@"

dirs=() failed=0
for seed in $SEEDS; do
    for arm in $ARMS; do
        while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n || failed=1; done
        study_train cpu "$arm" "$seed" &
        dirs+=("$OUT/$arm/seed$seed")
    done
done
while (( $(jobs -rp | wc -l) > 0 )); do wait -n || failed=1; done
study_compare "$failed" "${dirs[@]}"
