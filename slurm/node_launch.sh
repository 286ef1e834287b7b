#!/usr/bin/env bash
# One task per trainer node (started by `srun` in slurm/common.sh): torchrun for this node's processes.
#
# In:  GRPO_TRAIN_NODES (comma list, node_rank = position), GRPO_HEAD_ADDR, GRPO_MASTER_PORT,
#      GRPO_NPROC_PER_NODE, GRPO_RDZV_BACKEND (static|c10d), PYTHON; arguments: the trainer's arguments.
set -euo pipefail

node="${SLURMD_NODENAME:-$(hostname -s)}"
IFS=, read -ra nodes <<< "$GRPO_TRAIN_NODES"
# Our own position in the trainer node list, not SLURM_NODEID: when rollout nodes are separate the
# trainer step covers a subset of the allocation, and the rank order must match the head node choice.
node_rank=-1
for i in "${!nodes[@]}"; do
    [[ "${nodes[$i]}" == "$node" ]] && node_rank=$i
done
if (( node_rank < 0 )); then
    echo "ERROR: node $node is not one of the trainer nodes ($GRPO_TRAIN_NODES)" >&2
    exit 2
fi
nnodes=${#nodes[@]}
nproc=$GRPO_NPROC_PER_NODE
echo "node $node: node_rank $node_rank of $nnodes, global ranks $((node_rank * nproc))-$((node_rank * nproc + nproc - 1)), rendezvous ${GRPO_RDZV_BACKEND} at $GRPO_HEAD_ADDR:$GRPO_MASTER_PORT"

# PID files of this node's trainer processes: the batch script (on the head node) signals exactly these
# on pre-emption. Signalling the whole step through Slurm would also hit helper processes the trainer
# spawns (checkpoint writers, ...), which die on SIGUSR1 mid-save.
pid_dir="${TMPDIR:-/tmp}/grpo-slurm-${SLURM_JOB_ID:-local}.${SLURM_RESTART_COUNT:-0}"
mkdir -p "$pid_dir"
export GRPO_PID_DIR=$pid_dir

# torchrun has no SIGUSR1 handler and would die (orphaning its workers) if a user sends USR1 to the
# whole step (`scancel -s USR1`): it runs with USR1 ignored. The trainer processes install their own
# handler (checkpoint after the current step, exit 0) when the training loop starts.
trap '' USR1

# --no-python + bash: each worker records its PID and prints which rank it is on which node before
# becoming the trainer (exec keeps the PID), so the job log shows that every node took part.
rc=0
# shellcheck disable=SC2016
"$PYTHON" -m torch.distributed.run \
    --nnodes="$nnodes" --node-rank="$node_rank" --nproc-per-node="$nproc" \
    --rdzv-backend="$GRPO_RDZV_BACKEND" --rdzv-endpoint="$GRPO_HEAD_ADDR:$GRPO_MASTER_PORT" \
    --rdzv-id="${SLURM_JOB_ID:-local}" --max-restarts=0 \
    --no-python bash -c '
        echo "$BASHPID" > "$GRPO_PID_DIR/rank$RANK.pid"  # not $$: torchrun reads args as string.Template
        echo "worker rank $RANK of $WORLD_SIZE (local rank $LOCAL_RANK) on node ${SLURMD_NODENAME:-$(hostname -s)}"
        exec "$@"' worker "$PYTHON" -m grpo_megatron.train "$@" || rc=$?
rm -rf "$pid_dir"
exit "$rc"
