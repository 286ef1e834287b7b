# Shared body of the sbatch scripts (slurm/gspo_moe.sh, slurm/grpo_routing_replay.sh); sourced, not run.
#
# grpo_slurm_main DEFAULT_CONFIG [trainer overrides...] runs one job: preflight checks, optional SGLang
# servers, torchrun on every trainer node through one `srun`, pre-emption handling and requeue, and a
# clean stop of everything it started. Settings come from the environment (all optional):
#
#   CONFIG            run YAML (default: the script's DEFAULT_CONFIG)
#   RUN_DIR           overrides the config's run_dir (relative paths: to the submit directory)
#   HF_PATH           overrides model.hf_path       MCORE_PATH   overrides model.megatron_path
#   TRAIN_ARGS        more trainer overrides, e.g. "--train-iters 100 --expert-model-parallel-size 8"
#   GRPO_DEVICE       gpu | cpu | auto (default: cpu when the job has no GPUs; cpu hides CUDA, gloo)
#   NPROC_PER_NODE    trainer processes per node (default: GPUs per node, 1 on CPU)
#   ROLLOUT_NODES     nodes at the end of the allocation reserved for SGLang servers (default 0:
#                     servers colocated on the trainer nodes); only with rollout.engine: sglang
#   SGLANG_TP         --tp-size of each server (default: NPROC_PER_NODE); the trainer gets it as
#                     rollout.sglang.server_tp_size (one weight payload / update-group rank per server TP rank)
#   SGLANG_MEM_FRACTION  colocated GPU servers: --mem-fraction-static (default 0.5); they also start with
#                     --enable-memory-saver and release weights + KV cache while the trainer trains
#   SGLANG_ARGS       extra `sglang.launch_server` flags (e.g. "--mem-fraction-static 0.4" colocated)
#   SGLANG_START_TIMEOUT  seconds to wait for /health (default 900)
#   SGLANG_RESTART    1 | 0: the trainer restarts a dead or hung server in its step (default 1; bounds and
#                     health checks: rollout.sglang.max_restarts_per_server, health_interval_s, ...)
#   SGLANG_DETERMINISTIC  auto | 1 | 0: --enable-deterministic-inference, without which SGLang ignores the
#                     per-request seeds, so a resumed run does not redraw the same samples (default auto:
#                     1 on GPU, 0 on CPU; it costs some generation speed)
#   SGLang servers the job starts require an API key (--api-key): rollout.sglang.api_key when the config
#                     sets one, else a fresh random key per job, handed to the servers, the router and the
#                     trainer as GRPO_SGLANG_API_KEY in the environment (never in config.yaml or the logs)
#   SGLANG_ROUTER     auto | 0: put sglang-router in front of the servers when installed (default auto)
#   GRPO_PLAN         auto | 1 | 0: the preflight's memory plan on GPU jobs (python -m grpo_megatron.plan; default
#                     auto: stop a job that does not fit, warn when the plan cannot run; 1: it must run; 0: off)
#   GPU_MEMORY        per-GPU memory for the plan, e.g. 80GiB (default: nvidia-smi on the batch host)
#   PYTHON            interpreter with grpo_megatron installed (default: python3 on PATH)
#   SGLANG_PYTHON     interpreter of SGLang's own environment, for the servers and sglang-router (default:
#                     PYTHON). SGLang 0.5.23 pins torch 2.14.1 and transformers 5.19.0, not the trainer's
#                     tested pins; installed into the trainer's environment it replaces the torch that
#                     TransformerEngine and apex were built against. On GPU give it its own venv.
#   GLOO_SOCKET_IFNAME  network interface of the trainer's gloo control group across nodes (e.g. ib0, eth0);
#                     needed where a node's hostname resolves to a loopback address (127.0.1.1 in Debian's
#                     /etc/hosts), which gloo would bind to: checked before a multi-node job starts
#   CUDA_DEVICE_MAX_CONNECTIONS  set to 1 on GPU (megatron orders tensor/sequence-parallel communication
#                     against compute with one hardware queue; it warns or asserts without it)
#   SITE_SETUP        a file sourced first on the batch host and every node (module load, venv, ...)
#   MASTER_PORT       rendezvous port (default: derived from the job id)
#   GRPO_RDZV_BACKEND static | c10d (default static: node rank = position in the node list)
#   GRPO_MAX_REQUEUES stop requeueing after this many restarts (default 20)
#   GRPO_RESUME       1 | 0: pass --resume (default 1: a requeued or resubmitted job continues)

# shellcheck source=slurm/runtime_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/runtime_env.sh"

_GRPO_PIDS=()          # background srun clients started by this job, stopped by _grpo_cleanup
_GRPO_TRAIN_PID=""
_GRPO_PREEMPTED=0
_GRPO_REQUEUING=0
_GRPO_REPEATER=""

log() { echo "[grpo-slurm $(date +%H:%M:%S)] $*"; }
die() { echo "[grpo-slurm $(date +%H:%M:%S)] ERROR: $*" >&2; exit 2; }

# Stop every srun client we started (srun forwards the signal to its step's processes), give them
# KillWait-like grace, then SIGKILL. Runs on every exit path, including `set -e` failures.
_grpo_cleanup() {
    local rc=$?
    trap - EXIT USR1 TERM INT
    [[ -n "$_GRPO_REPEATER" ]] && kill "$_GRPO_REPEATER" 2>/dev/null || true
    local pid alive=()
    for pid in "${_GRPO_PIDS[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            alive+=("$pid")
        fi
    done
    if (( ${#alive[@]} )); then
        log "stopping ${#alive[@]} step(s) still running"
        for _ in $(seq 1 30); do
            local any=0
            for pid in "${alive[@]}"; do kill -0 "$pid" 2>/dev/null && any=1; done
            (( any )) || break
            sleep 1
        done
        for pid in "${alive[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    fi
    exit "$rc"
}

# USR1 is the `#SBATCH --signal=B:USR1@...` warning before the time limit (or `scancel -b -s USR1`):
# ask the trainer to checkpoint after its current step, and remember to requeue afterwards.
# TERM is a cancel, a pre-emption by Slurm or the limit itself: forward it, but do not requeue
# ourselves (a user's scancel must stay cancelled; Slurm requeues pre-empted jobs on its own).
_grpo_on_signal() {
    local sig=$1
    if (( _GRPO_REQUEUING )); then
        exit 0  # `scontrol requeue` terminates this shell: nothing left to do
    fi
    [[ "$sig" == USR1 ]] && _GRPO_PREEMPTED=1
    log "received SIG$sig: asking the trainer to save a checkpoint after the current step and exit"
    if [[ -n "$_GRPO_TRAIN_PID" ]] && kill -0 "$_GRPO_TRAIN_PID" 2>/dev/null; then
        _grpo_signal_trainer
        # Processes still setting up ignore USR1 (their handler comes with the training loop), so repeat.
        if [[ -z "$_GRPO_REPEATER" ]]; then
            (while sleep 60; do kill -0 "$_GRPO_TRAIN_PID" 2>/dev/null || exit 0; _grpo_signal_trainer; done) &
            _GRPO_REPEATER=$!
        fi
    fi
}

# SIGUSR1 to the trainer processes only (their PIDs from node_launch.sh), not to the whole step: helper
# processes the trainer spawns (checkpoint writers, ...) would die of it. One rank is enough (the trainer
# all-reduces the stop flag); this shell runs on the head node, so its local ranks are signalled directly.
_grpo_signal_trainer() {
    local dir="${TMPDIR:-/tmp}/grpo-slurm-$SLURM_JOB_ID.${SLURM_RESTART_COUNT:-0}" pids
    pids=$(cat "$dir"/rank*.pid 2>/dev/null | tr '\n' ' ')
    if [[ -n "${pids// }" ]]; then
        # shellcheck disable=SC2086
        kill -USR1 $pids 2>/dev/null || true
    else
        # The batch shell is not on a trainer node (unusual site setup): signal from a step on each.
        srun --overlap --nodes="${#TRAIN_NODES[@]}" --ntasks-per-node=1 --nodelist="$GRPO_TRAIN_NODES" \
            bash -c "cat '$dir'/rank*.pid 2>/dev/null | xargs -r kill -USR1" || true
    fi
}

# The latest complete checkpoint's step (0 when none): what a requeued job resumes from.
_grpo_latest_step() {
    local last
    last=$(find "$RUN_DIR/checkpoints" -maxdepth 1 -name 'step_*' -type d 2>/dev/null | sort | tail -n 1)
    [[ -n "$last" ]] && echo $((10#${last##*step_})) || echo 0
}

_grpo_node_addr() {
    local addr
    addr=$(scontrol show node "$1" -o 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
    echo "${addr:-$1}"
}

_grpo_http_ok() {
    "$PYTHON" -c 'import sys, urllib.request
try:
    sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=5).status == 200 else 1)
except Exception:
    sys.exit(1)' "$1"
}

# Wait for URL/health while the srun client PID lives (and the keeper, when its record is given, has not seen
# the server exit); die with the server log's tail otherwise.
_grpo_wait_health() {
    local url=$1 pid=$2 logfile=$3 record=${4:-} deadline=$((SECONDS + ${SGLANG_START_TIMEOUT:-900}))
    until _grpo_http_ok "$url/health"; do
        if ! kill -0 "$pid" 2>/dev/null || { [[ -n "$record" ]] && grep -q '"exit_code": -\?[0-9]' "$record" 2>/dev/null; }; then
            tail -n 30 "$logfile" >&2 || true
            die "SGLang server for $url exited before becoming healthy (log: $logfile)"
        fi
        (( SECONDS < deadline )) || die "SGLang server $url not healthy after ${SGLANG_START_TIMEOUT:-900}s (log: $logfile)"
        sleep 5
    done
    log "SGLang server $url is healthy"
}

# A fresh random key per job: the servers listen on 0.0.0.0 and their weight-update endpoints load any
# path they are given, so nobody without the key may call them.
_grpo_api_key() {
    od -An -tx1 -N24 /dev/urandom | tr -d ' \n'
}

# `sglang.launch_server` flags beyond model/host/port: TP size, R3's routed experts, deterministic sampling
# (per-request seeds are ignored without it), the memory saver for colocated GPU servers (without it SGLang's
# release frees nothing, and its default static fraction leaves the trainer ~10% of the GPU), the API key (as a
# reference expanded inside the step, so the key is not on srun's or this script's command line), then
# SGLANG_ARGS (last: they win). Args: device routing_replay [colocated 0|1].
_grpo_sglang_flags() {
    local device=$1 replay=$2 colocated=${3:-0} deterministic=${SGLANG_DETERMINISTIC:-auto}
    [[ "$deterministic" == auto ]] && { [[ "$device" == gpu ]] && deterministic=1 || deterministic=0; }
    [[ "$deterministic" =~ ^[01]$ ]] || die "SGLANG_DETERMINISTIC=$deterministic: use auto, 1 or 0"
    local flags="--tp-size ${SGLANG_TP:-$NPROC_PER_NODE}"
    [[ "$replay" == r3 ]] && flags+=" --enable-return-routed-experts"
    (( deterministic )) && flags+=" --enable-deterministic-inference"
    [[ "$device" == gpu ]] && (( colocated )) && flags+=" --enable-memory-saver --mem-fraction-static ${SGLANG_MEM_FRACTION:-0.5}"
    flags+=' --api-key "$GRPO_SGLANG_API_KEY"'
    echo "$flags ${SGLANG_ARGS:-}"
}

# Start one SGLang server per rollout node, wait for /health, put sglang-router in front when it is
# installed; sets SGLANG_URLS (comma list of the servers, for --rollout.sglang.urls: weights are pushed to each)
# and SGLANG_ROUTER_URL (for --rollout.sglang.router_url: generation only; empty without a router).
_grpo_start_sglang() {
    local nodes=("$@") base=$(( ${SGLANG_PORT_BASE:-$((25000 + (SLURM_JOB_ID % 1000) * 16))} ))
    SGLANG_PYTHON=${SGLANG_PYTHON:-$PYTHON}
    local nodelist
    nodelist=$(IFS=,; echo "${nodes[*]}")
    # One cheap srun before loading anything: a missing install is the most common rollout failure.
    if ! srun --overlap --nodes="${#nodes[@]}" --ntasks-per-node=1 --nodelist="$nodelist" \
            bash -c "${SITE_SETUP:+source '$SITE_SETUP';} '$SGLANG_PYTHON' -c 'import sglang'" >/dev/null 2>&1; then
        die "SGLang is not importable by $SGLANG_PYTHON on the rollout nodes ($nodelist): install it in its own" \
            "venv (pip install 'sglang[all]==0.5.23') and set SGLANG_PYTHON to that venv's python"
    fi
    local urls=() i node port url logfile flags
    # The keepers' control directory, one per job run (a requeued job starts fresh servers and records).
    SGLANG_RESTART_DIR="$RUN_DIR/slurm/sglang-servers-$SLURM_JOB_ID.${SLURM_RESTART_COUNT:-0}"
    mkdir -p "$SGLANG_RESTART_DIR"
    flags=$(_grpo_sglang_flags "$GRPO_DEVICE_KIND" "$ROUTING_REPLAY" "$(( ${ROLLOUT_NODES:-0} == 0 ))")
    for i in "${!nodes[@]}"; do
        node=${nodes[$i]}
        port=$((base + i))  # distinct per server, so simulated nodes on one host do not collide
        url="http://$(_grpo_node_addr "$node"):$port"
        logfile="$RUN_DIR/slurm/sglang-$SLURM_JOB_ID-$node.log"
        # --overlap: colocated servers share the trainer nodes' resources with the trainer step. The step runs
        # the server under a keeper (stdlib only, run by path), which restarts it in this step when the trainer
        # asks through SGLANG_RESTART_DIR (rollout.sglang.restart_dir; slurm/README.md, "Rollout server faults").
        # CUDA_DEVICE_MAX_CONNECTIONS=1 is megatron's need (runtime_env.sh), not SGLang's: it would serialise
        # SGLang's overlapped streams.
        srun --overlap --nodes=1 --ntasks=1 --nodelist="$node" --kill-on-bad-exit=1 \
            bash -c "${SITE_SETUP:+source '$SITE_SETUP';} unset CUDA_DEVICE_MAX_CONNECTIONS; \
                exec '$SGLANG_PYTHON' '$GRPO_REPO/grpo_megatron/rollout/sglang/keeper.py' \
                --dir '$SGLANG_RESTART_DIR' --name '$node' --url '$url' --log '$logfile' -- \
                '$SGLANG_PYTHON' -m sglang.launch_server \
                --model-path '$MODEL_HF_PATH' --host 0.0.0.0 --port $port $flags" >"${logfile%.log}.keeper.log" 2>&1 &
        _GRPO_PIDS+=($!)
        log "SGLang server on $node: $url (log $logfile)"
        urls+=("$url")
    done
    for i in "${!urls[@]}"; do
        _grpo_wait_health "${urls[$i]}" "${_GRPO_PIDS[$i]}" "$RUN_DIR/slurm/sglang-$SLURM_JOB_ID-${nodes[$i]}.log" \
            "$SGLANG_RESTART_DIR/${nodes[$i]}.json"
    done
    SGLANG_URLS=$(IFS=,; echo "${urls[*]}")
    SGLANG_ROUTER_URL=
    if [[ "${SGLANG_ROUTER:-auto}" != 0 ]] && "$SGLANG_PYTHON" -c 'import sglang_router' 2>/dev/null; then
        local rport=$((base + 15)) head=${nodes[0]} rlog="$RUN_DIR/slurm/sglang-router-$SLURM_JOB_ID.log"
        url="http://$(_grpo_node_addr "$head"):$rport"
        srun --overlap --nodes=1 --ntasks=1 --nodelist="$head" \
            bash -c "${SITE_SETUP:+source '$SITE_SETUP';} exec '$SGLANG_PYTHON' -m sglang_router.launch_router \
                --worker-urls ${urls[*]} --host 0.0.0.0 --port $rport --api-key \"\$GRPO_SGLANG_API_KEY\"" \
            >"$rlog" 2>&1 &
        _GRPO_PIDS+=($!)
        _grpo_wait_health "$url" "$!" "$rlog"
        SGLANG_ROUTER_URL=$url
    fi
}

# Disk weight sync: the directory the preflight wrote a marker into must be readable on every server node
# (a node-local /tmp is not: the servers would answer HTTP 400 at the first sync). Args: marker nodes...
_grpo_check_shared_dir() {
    local marker=$1 nodelist
    shift
    nodelist=$(IFS=,; echo "$*")
    srun --overlap --nodes="$#" --ntasks-per-node=1 --nodelist="$nodelist" test -r "$marker" >/dev/null 2>&1 \
        || die "rollout.sglang.disk_dir=$(dirname "$marker") is not visible from every server node ($nodelist):" \
               "set it to a shared filesystem path (default RUN_DIR/weights), or use weight_sync: tensor/distributed"
}

grpo_slurm_main() {
    local default_config=$1
    shift
    [[ -n "${SLURM_JOB_ID:-}" ]] || die "run this script with sbatch (or inside salloc): SLURM_JOB_ID is unset"
    trap _grpo_cleanup EXIT
    trap '_grpo_on_signal USR1' USR1
    trap '_grpo_on_signal TERM' TERM
    trap '_grpo_on_signal TERM' INT

    # Relative paths (config, run_dir) mean what they meant where `sbatch` was typed.
    cd "${SLURM_SUBMIT_DIR:-$PWD}"
    if [[ -n "${SITE_SETUP:-}" ]]; then
        [[ -f "$SITE_SETUP" ]] || die "SITE_SETUP=$SITE_SETUP does not exist"
        # shellcheck disable=SC1090
        source "$SITE_SETUP"
    fi
    PYTHON=${PYTHON:-python3}
    command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON not found on $(hostname -s); set PYTHON or SITE_SETUP"
    export PYTHON PYTHONUNBUFFERED=1
    export PYTHONPATH="$GRPO_REPO${PYTHONPATH:+:$PYTHONPATH}"

    local config=${CONFIG:-$default_config}
    [[ -f "$config" ]] || die "config file $config does not exist (set CONFIG=path/to/run.yaml)"

    # Device: a job without GPUs runs the CPU mode (gloo), whatever the config says.
    local gpus=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}
    gpus=${gpus##*:}
    [[ "$gpus" =~ ^[0-9]+$ ]] || gpus=0
    local device=${GRPO_DEVICE:-auto}
    [[ "$device" == auto ]] && { (( gpus > 0 )) && device=gpu || device=cpu; }
    GRPO_DEVICE_KIND=$device
    _grpo_sglang_python
    if [[ "$device" == cpu ]]; then
        export CUDA_VISIBLE_DEVICES=""
        NPROC_PER_NODE=${NPROC_PER_NODE:-1}
    else
        (( gpus > 0 )) || die "GRPO_DEVICE=gpu but the job has no GPUs: submit with --gpus-per-node=N"
        NPROC_PER_NODE=${NPROC_PER_NODE:-$gpus}
    fi

    # Nodes: trainer nodes first, dedicated rollout nodes (if any) at the end of the allocation.
    local all_nodes
    mapfile -t all_nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    local rollout_n=${ROLLOUT_NODES:-0} total=${#all_nodes[@]}
    (( rollout_n < total )) || die "ROLLOUT_NODES=$rollout_n leaves no trainer node in a $total-node job; submit with --nodes=$((rollout_n + 1)) or more"
    local train_n=$((total - rollout_n))
    TRAIN_NODES=("${all_nodes[@]:0:train_n}")
    ROLLOUT_NODE_LIST=("${all_nodes[@]:train_n}")
    local world=$((train_n * NPROC_PER_NODE))
    local node addrs=()
    for node in "${TRAIN_NODES[@]}"; do addrs+=("$(_grpo_node_addr "$node")"); done
    _grpo_runtime_env "$device" "${addrs[@]}"

    # Overrides, in increasing precedence: env paths, TRAIN_ARGS, the script's own arguments.
    local overrides=()
    [[ -n "${HF_PATH:-}" ]] && overrides+=(--model.hf_path "$HF_PATH")
    [[ -n "${MCORE_PATH:-}" ]] && overrides+=(--model.megatron_path "$MCORE_PATH")
    # shellcheck disable=SC2206
    [[ -n "${TRAIN_ARGS:-}" ]] && overrides+=($TRAIN_ARGS)
    overrides+=("$@")

    log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $total node(s) ${all_nodes[*]}, device $device, $NPROC_PER_NODE process(es) per trainer node, config $config"
    local checks plan_args=(--plan "${GRPO_PLAN:-auto}")
    if [[ "$device" == gpu ]]; then
        local gpu_memory=${GPU_MEMORY:-}
        if [[ -z "$gpu_memory" ]] && command -v nvidia-smi >/dev/null; then
            gpu_memory=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -n 1 | tr -d ' ')
            [[ "$gpu_memory" =~ ^[0-9]+$ ]] && gpu_memory="${gpu_memory}MiB" || gpu_memory=
        fi
        plan_args+=(--trainer-nodes "$train_n" --gpus-per-node "$NPROC_PER_NODE" --rollout-nodes "$rollout_n"
                    --gpu-memory "$gpu_memory")
        log "preflight: memory plan of every distinct trainer rank (a minute or so each; GRPO_PLAN=0 skips it)"
    fi
    checks=$("$PYTHON" "$GRPO_REPO/slurm/preflight.py" --config "$config" --world-size "$world" \
        --layout-hint "$train_n trainer node(s) x $NPROC_PER_NODE process(es) = $world" "${plan_args[@]}" \
        --run-dir "${RUN_DIR:-}" --job-id "$SLURM_JOB_ID" "${overrides[@]}") \
        || die "preflight failed (message above); nothing was started"
    eval "$checks"
    log "run_dir $RUN_DIR, layout $LAYOUT, $TRAIN_STEPS steps, rollout engine $ROLLOUT_ENGINE"

    local trainer_args=(--config "$RESOLVED_CONFIG")
    [[ "${GRPO_RESUME:-1}" == 1 ]] && trainer_args+=(--resume)
    if [[ "$ROLLOUT_ENGINE" == sglang ]]; then
        if [[ -n "$CONFIG_SGLANG_URLS" ]]; then
            log "rollout.sglang.urls set in the config ($CONFIG_SGLANG_URLS): using those servers, starting none"
        else
            local server_nodes=("${ROLLOUT_NODE_LIST[@]}")
            (( ${#server_nodes[@]} )) || server_nodes=("${TRAIN_NODES[@]}")
            # Exported: the server steps and the trainer (rollout.sglang.api_key unset) read it from there.
            export GRPO_SGLANG_API_KEY=${CONFIG_SGLANG_API_KEY:-$(_grpo_api_key)}
            [[ -z "$WEIGHTS_MARKER" ]] || _grpo_check_shared_dir "$WEIGHTS_MARKER" "${server_nodes[@]}"
            _grpo_start_sglang "${server_nodes[@]}"
            trainer_args+=(--rollout.sglang.urls "$SGLANG_URLS"
                           --rollout.sglang.server_tp_size "${SGLANG_TP:-$NPROC_PER_NODE}"
                           --rollout.sglang.colocated "$( (( rollout_n == 0 )) && echo true || echo false)"
                           --rollout.sglang.gpu_servers "$( [[ "$device" == gpu ]] && echo true || echo false)")
            [[ -z "$SGLANG_ROUTER_URL" ]] || trainer_args+=(--rollout.sglang.router_url "$SGLANG_ROUTER_URL")
            # Dead or hung servers are restarted in their step (SGLANG_RESTART=0: reported only).
            [[ "${SGLANG_RESTART:-1}" == 0 ]] || trainer_args+=(--rollout.sglang.restart_dir "$SGLANG_RESTART_DIR")
        fi
    elif (( rollout_n > 0 )); then
        die "ROLLOUT_NODES=$rollout_n but rollout.engine is $ROLLOUT_ENGINE: dedicated rollout nodes need rollout.engine: sglang"
    fi

    local head=${TRAIN_NODES[0]}
    export GRPO_TRAIN_NODES GRPO_HEAD_ADDR GRPO_MASTER_PORT GRPO_NPROC_PER_NODE GRPO_RDZV_BACKEND
    GRPO_TRAIN_NODES=$(IFS=,; echo "${TRAIN_NODES[*]}")
    GRPO_HEAD_ADDR=$(_grpo_node_addr "$head")
    # Port from the job id: two jobs sharing a node do not collide, a requeued job reuses its port.
    GRPO_MASTER_PORT=${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 10000))}
    GRPO_NPROC_PER_NODE=$NPROC_PER_NODE
    GRPO_RDZV_BACKEND=${GRPO_RDZV_BACKEND:-static}
    log "trainer: torchrun on ${TRAIN_NODES[*]} (head $head at $GRPO_HEAD_ADDR:$GRPO_MASTER_PORT), world size $world"

    # One task per trainer node; --kill-on-bad-exit: one failing node stops the others at once.
    local setup="${SITE_SETUP:+source '$SITE_SETUP';}"
    srun --nodes="$train_n" --ntasks-per-node=1 --nodelist="$GRPO_TRAIN_NODES" --kill-on-bad-exit=1 \
        --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --label \
        bash -c "$setup exec bash '$GRPO_REPO/slurm/node_launch.sh' \"\$@\"" node_launch "${trainer_args[@]}" &
    _GRPO_TRAIN_PID=$!
    _GRPO_PIDS+=("$_GRPO_TRAIN_PID")

    # `wait` returns early (status > 128) whenever a trapped signal arrives: keep waiting for the trainer.
    local rc
    while :; do
        rc=0
        wait "$_GRPO_TRAIN_PID" || rc=$?
        if (( rc > 128 )) && kill -0 "$_GRPO_TRAIN_PID" 2>/dev/null; then
            continue
        fi
        break
    done
    local step
    step=$(_grpo_latest_step)
    if (( rc != 0 )); then
        die "trainer failed (exit $rc); latest checkpoint: step $step; see the log above"
    fi
    if (( _GRPO_PREEMPTED && step < TRAIN_STEPS )); then
        local restarts=${SLURM_RESTART_COUNT:-0}
        if (( restarts >= ${GRPO_MAX_REQUEUES:-20} )); then
            die "pre-empted at step $step, but already requeued $restarts times (GRPO_MAX_REQUEUES); resubmit to continue"
        fi
        log "pre-empted: checkpoint at step $step of $TRAIN_STEPS; requeueing job $SLURM_JOB_ID (it resumes from there)"
        _GRPO_REQUEUING=1
        scontrol requeue "$SLURM_JOB_ID" || die "scontrol requeue failed (submit with --requeue); resubmit to resume"
        exit 0
    fi
    log "done: step $step of $TRAIN_STEPS, run_dir $RUN_DIR"
}
