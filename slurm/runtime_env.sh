# The environment a GPU job's processes need (sourced by slurm/common.sh, which defines log and die):
# SGLang's own interpreter, CUDA_DEVICE_MAX_CONNECTIONS and the gloo interface check.

# SGLang's interpreter (its own venv on GPU: its torch pin is not the trainer's); PYTHON when unset.
_grpo_sglang_python() {
    SGLANG_PYTHON=${SGLANG_PYTHON:-$PYTHON}
    command -v "$SGLANG_PYTHON" >/dev/null || die "SGLANG_PYTHON=$SGLANG_PYTHON not found; point it at SGLang's venv python"
    if [[ "$SGLANG_PYTHON" == "$PYTHON" && "${GRPO_DEVICE_KIND:-cpu}" == gpu ]]; then
        log "WARNING: SGLang runs in the trainer's environment (PYTHON); SGLang 0.5.23 pins torch 2.14.1, which" \
            "replaces the torch TransformerEngine and apex were built against: set SGLANG_PYTHON to its own venv"
    fi
}

# GPU runtime environment: one CUDA hardware queue for megatron's communication ordering, and, for a gloo
# group across hosts, an interface that is not loopback. Args: device, then the trainer nodes' addresses
# (nodes simulated on one host share one address, where loopback is right).
_grpo_runtime_env() {
    local device=$1 hosts
    shift
    [[ "$device" == gpu ]] && export CUDA_DEVICE_MAX_CONNECTIONS=1
    hosts=$(printf '%s\n' "$@" | sort -u | wc -l)
    if (( hosts > 1 )) && [[ -z "${GLOO_SOCKET_IFNAME:-}" ]]; then
        local host addr
        host=$(hostname)
        addr=$(getent hosts "$host" | awk '{print $1; exit}')
        [[ "$addr" == 127.* || "$addr" == ::1 ]] && die "hostname $host resolves to $addr (loopback), so gloo's" \
            "control group across nodes would hang: set GLOO_SOCKET_IFNAME to the nodes' network interface (e.g. eth0, ib0)"
    fi
    return 0
}
