#!/usr/bin/env bash
# The CPU stability study v2 in one command: rollouts from a REAL SGLang server (the pinned version from
# tests/sglang_live/install_sglang.sh) computing in bfloat16 while the trainer runs in float32, so train and
# rollout log-probs (and routes) differ as they do with a separate inference engine. Six arms (GRPO, GRPO+R2,
# GRPO+R3, GRPO+token TIS, GSPO, GSPO+sequence TIS) for every seed on the tiny MoE copy task, then
# tools/compare_runs.py over all runs.
#
#   examples/stability/run_cpu_sglang_study.sh                       # 6 arms x seeds 1 2 3, two lanes
#   SEEDS="1" JOBS=1 examples/stability/run_cpu_sglang_study.sh      # one seed, one lane
#   ARMS="grpo grpo_tis" STEPS=10 examples/stability/run_cpu_sglang_study.sh -- --train.lr 1e-3
#
# Environment: ARMS, SEEDS, JOBS (lanes: each lane starts ONE server and runs its share of the runs one
# after another against it; every run pushes its own weights after its SFT warm start, before any rollout
# or eval, so a reused server holds that run's weights), STEPS (overrides train.steps), DTYPE (the
# server's --dtype, default bfloat16), OUT (default runs/stability/cpu_sglang), CACHE, PYTHON.
# Arguments after `--` are extra trainer overrides for every run. Each run is logged to OUT/ARM/seedN.log,
# each server to OUT/server_laneI.log.
# The commands and timings of the recorded study are in docs/stability.md (section v2).
set -euo pipefail

ARMS=${ARMS:-"grpo grpo_r2 grpo_r3 grpo_tis gspo gspo_seqcorr"}
SEEDS=${SEEDS:-"1 2 3"}
JOBS=${JOBS:-2}
DTYPE=${DTYPE:-bfloat16}
OUT=${OUT:-runs/stability/cpu_sglang}
# shellcheck source=examples/stability/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" "$@"
"$PYTHON" -c "from tests.sglang_live.server import venv_ready, INSTALL_HINT; import sys
sys.exit(0 if venv_ready() else f'no pinned SGLang venv: {INSTALL_HINT}')"
mkdir -p "$OUT"

# Each lane writes its server's pid to OUT/server_laneI.pid; they are stopped when their lane ends, and all of
# them on any exit of this script (server.py stops its SGLang process group on SIGTERM).
cleanup() {
    local f
    for f in "$OUT"/server_lane*.pid; do [[ -s "$f" ]] && kill "$(cat "$f")" 2>/dev/null; rm -f "$f"; done
    return 0
}
trap cleanup EXIT

wait_healthy() {  # PORT PID
    local _
    for _ in $(seq 900); do  # up to 15 min: a CPU server starts in ~45 s on 2 idle cores, minutes on busy ones
        curl -sf "http://127.0.0.1:$1/health" >/dev/null 2>&1 && return 0
        kill -0 "$2" 2>/dev/null || return 1
        sleep 1
    done
    return 1
}

runs=() dirs=()
for seed in $SEEDS; do
    for arm in $ARMS; do runs+=("$arm $seed"); dirs+=("$OUT/$arm/seed$seed"); done
done

run_lane() {  # LANE: one server, then every JOBS-th run from LANE on against it, one after another
    local lane=$1 port server failed=0 i
    port=$("$PYTHON" -c "from grpo_megatron.parallel import free_port; print(free_port())")
    "$PYTHON" -m tests.sglang_live.server "$CACHE/tiny_qwen3_moe_hf" --port "$port" --routed-experts \
        --log "$OUT/server_lane$lane.log" --dtype "$DTYPE" >"$OUT/server_lane$lane.out" 2>&1 &
    server=$!
    echo "$server" >"$OUT/server_lane$lane.pid"
    if ! wait_healthy "$port" "$server"; then
        echo "[study] SGLang server of lane $lane did not start, see $OUT/server_lane$lane.log" >&2
        kill "$server" 2>/dev/null
        return 1
    fi
    echo "[study] lane $lane: SGLang ($DTYPE) healthy at http://127.0.0.1:$port"
    for ((i = lane; i < ${#runs[@]}; i += JOBS)); do
        study_train cpu_sglang ${runs[$i]} --rollout.sglang.urls "http://127.0.0.1:$port" || failed=1
    done
    kill "$server" 2>/dev/null
    wait "$server" 2>/dev/null || true
    rm -f "$OUT/server_lane$lane.pid"
    return "$failed"
}

lane_pids=() failed=0
for ((lane = 0; lane < JOBS; lane++)); do run_lane "$lane" & lane_pids+=($!); done
for pid in "${lane_pids[@]}"; do wait "$pid" || failed=1; done
study_compare "$failed" "${dirs[@]}"
