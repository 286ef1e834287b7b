#!/usr/bin/env bash
# GSPO on an MoE model (megatron-core trainer + SGLang or embedded rollouts), multi-node.
#
#   sbatch slurm/gspo_moe.sh                                   # the defaults below
#   sbatch --nodes=4 --time=24:00:00 slurm/gspo_moe.sh --train-iters 500
#   CONFIG=my_run.yaml HF_PATH=/models/Qwen3-30B-A3B sbatch slurm/gspo_moe.sh
#   sbatch --gpus-per-node=0 --cpus-per-task=2 slurm/gspo_moe.sh   # CPU mode (gloo), e.g. tiny_cpu
#
# Every #SBATCH line is a default: options on the sbatch command line win. The environment variables
# read (CONFIG, RUN_DIR, HF_PATH, MCORE_PATH, TRAIN_ARGS, ROLLOUT_NODES, ...) are listed in
# slurm/common.sh; arguments after the script name are trainer overrides. Submit from the repository
# root (or override --output): Slurm does not create the log directory, slurm/logs/ exists for it.
#
#SBATCH --job-name=gspo-moe
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --time=04:00:00
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

grpo_slurm_main "$GRPO_REPO/slurm/configs/gspo_moe.yaml" "$@"
