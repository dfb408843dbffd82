#!/usr/bin/env bash
# Submit with: sbatch slurm/train_lbmrc.sh [--config configs/xquad.yaml] [key=value ...]
# One task per GPU; srun starts every rank of the one torch.distributed world (the
# trainer reads SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID and the first node's address).
#
# Lines a user edits are marked EDIT. The defaults run the demo on CPUs (2 tasks on one
# node). On a GPU cluster: set --nodes, --ntasks-per-node to the GPUs per node, turn the
# --gres line on (remove one '#': "##SBATCH" is a comment to sbatch) with the same count,
# give each task its share of the node's CPU cores, and set --time.
#SBATCH --job-name=dist_xqa
#SBATCH --nodes=1                # EDIT: nodes
#SBATCH --ntasks-per-node=2      # EDIT: one task per GPU (GPUs per node)
##SBATCH --gres=gpu:2            # EDIT (GPU clusters): "#SBATCH --gres=gpu:<GPUs per node>"
#SBATCH --cpus-per-task=1        # EDIT: CPU cores per task (GPU nodes: e.g. cores per node / GPUs per node)
##SBATCH --time=24:00:00         # EDIT: the time limit (default: the partition's)
##SBATCH --partition=gpu         # EDIT: the partition, if the cluster has no default
#SBATCH --requeue                # a requeued (preempted, resubmitted) job resumes from its checkpoints
#SBATCH --signal=USR1@120        # USR1 to every task 120 s before the time limit
#SBATCH --output=slurm-%j.out
#SBATCH --open-mode=append       # a requeued job adds to its log instead of replacing it
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
export PATH="$PWD/.venv/bin:$PATH"
[ -x .venv/bin/python ] || { echo "run scripts/setup.sh first" >&2; exit 1; }
if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  export DS_ACCELERATOR=cpu
fi
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n 1 || echo localhost)}
export MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}  # EDIT (or set DS_CONFIG when submitting): the ZeRO stage
# On USR1 the trainer checkpoints, exits 0 and creates this file: the job is then requeued
# (same job id, same command) and resumes from its checkpoints.
export DIST_XQA_REQUEUE_MARKER="$PWD/.dist_xqa-requeue-${SLURM_JOB_ID:-0}"
rm -f "$DIST_XQA_REQUEUE_MARKER"
# --kill-on-bad-exit: one rank that fails ends the job, instead of leaving the others
# waiting (each would stop after run.stall_timeout_s, but the allocation is held until then).
srun --kill-on-bad-exit=1 python dist_xqa/train.py --deepspeed "$DS_CONFIG" "$@"
if [ -e "$DIST_XQA_REQUEUE_MARKER" ]; then
  rm -f "$DIST_XQA_REQUEUE_MARKER"
  echo "dist_xqa: stopped before the time limit; requeueing job $SLURM_JOB_ID" >&2
  scontrol requeue "$SLURM_JOB_ID"
fi
