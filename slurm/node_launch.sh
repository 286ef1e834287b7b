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

# Slurm delivers the pre-emption SIGUSR1 to every process of the step. torchrun has no handler for it
# and would die, orphaning its workers, so it runs with USR1 ignored; the trainer processes install
# their own handler (checkpoint after the current step, exit 0) and torchrun then exits 0 with them.
trap '' USR1

# --no-python + bash: each worker prints which rank it is on which node before becoming the trainer,
# so the job log shows that every node took part.
# shellcheck disable=SC2016
exec "$PYTHON" -m torch.distributed.run \
    --nnodes="$nnodes" --node-rank="$node_rank" --nproc-per-node="$nproc" \
    --rdzv-backend="$GRPO_RDZV_BACKEND" --rdzv-endpoint="$GRPO_HEAD_ADDR:$GRPO_MASTER_PORT" \
    --rdzv-id="${SLURM_JOB_ID:-local}" --max-restarts=0 \
    --no-python bash -c '
        echo "worker rank $RANK of $WORLD_SIZE (local rank $LOCAL_RANK) on node ${SLURMD_NODENAME:-$(hostname -s)}"
        exec "$@"' worker "$PYTHON" -m grpo_megatron.train "$@"
