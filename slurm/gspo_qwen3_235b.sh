#!/usr/bin/env bash
# GSPO on Qwen3-235B-A22B: 16 trainer nodes + 4 dedicated SGLang nodes (slurm/configs/gspo_qwen3_235b.yaml).
#
#   sbatch slurm/gspo_qwen3_235b.sh                           # the defaults below (20 nodes, 4 for SGLang)
#   HF_PATH=/models/Qwen3-235B-A22B MCORE_PATH=/models/Qwen3-235B-A22B-mcore sbatch slurm/gspo_qwen3_235b.sh
#   ROLLOUT_NODES=8 sbatch --nodes=24 slurm/gspo_qwen3_235b.sh    # more generation throughput, same trainer
#
# Check a changed allocation before submitting it (the preflight runs the same plan and stops a job that does
# not fit): python -m grpo_megatron.plan --config slurm/configs/gspo_qwen3_235b.yaml --nodes 20 --gpus-per-node 8 \
#     --gpu-memory 80GiB --rollout-nodes 4
#
# Every #SBATCH line is a default: options on the sbatch command line win. The environment variables
# read (CONFIG, RUN_DIR, HF_PATH, MCORE_PATH, TRAIN_ARGS, ROLLOUT_NODES, ...) are listed in
# slurm/common.sh; arguments after the script name are trainer overrides. Submit from the repository
# root (or override --output): Slurm does not create the log directory, slurm/logs/ exists for it.
#
#SBATCH --job-name=gspo-235b
#SBATCH --nodes=20
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --output=slurm/logs/%x-%j.out
#SBATCH --open-mode=append
#  USR1 to this script 5 minutes before the time limit: the trainer checkpoints and the job requeues.
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
set -euo pipefail

# sbatch runs a copy of this file from its spool directory, so find the repository through the path
# Slurm recorded at submission (or GRPO_REPO), not through $0.
if [[ -z "${GRPO_REPO:-}" ]]; then
    if [[ -n "${SLURM_JOB_ID:-}" ]]; then
        script=$(scontrol show job "$SLURM_JOB_ID" -o | grep -o ' Command=[^ ]*' | cut -d= -f2-)
        [[ -f "$script" ]] && GRPO_REPO=$(cd "$(dirname "$script")/.." && pwd)
    fi
    GRPO_REPO=${GRPO_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
fi
export GRPO_REPO
# shellcheck source=slurm/common.sh
source "$GRPO_REPO/slurm/common.sh"

# The last ROLLOUT_NODES nodes of the allocation run SGLang (TP 8 each); the rest train (world = 8 x the rest).
export ROLLOUT_NODES=${ROLLOUT_NODES:-4}
# The dedicated servers' static pool, as the memory plan assumes it (SGLang's own default depends on the card).
export SGLANG_ARGS=${SGLANG_ARGS:---mem-fraction-static 0.85}
grpo_slurm_main "$GRPO_REPO/slurm/configs/gspo_qwen3_235b.yaml" "$@"
