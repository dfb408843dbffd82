#!/usr/bin/env bash
# Submit with: sbatch [sbatch options] slurm/train_lbmrc.sh [--config configs/xquad.yaml] [key=value ...]
# One task per GPU; srun starts every rank of the one torch.distributed world (the trainer
# reads SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID and the step's first node, never a
# RANK or MASTER_ADDR left in the submitting shell, and pins each task to GPU
# local rank % the GPUs it sees).
#
# The defaults below are one node of 8 GPUs, one task per GPU with 8 cores each. sbatch
# options on the command line replace them, nothing here needs editing:
#   sbatch --nodes 2 slurm/train_lbmrc.sh ...                                     # 16 GPUs
#   sbatch --nodes 4 --gres=gpu:4 --ntasks-per-node=4 slurm/train_lbmrc.sh ...    # 4-GPU nodes
#   sbatch --time 24:00:00 --partition gpu slurm/train_lbmrc.sh ...               # limit, partition
#   sbatch --gres=none --ntasks-per-node=2 --cpus-per-task=1 slurm/train_lbmrc.sh # CPU only (the demo, CI)
# --gres and --ntasks-per-node go together (one task per GPU). Give each task its share of
# the node's cores (--cpus-per-task): rank 0 prepares the data with them.
#
# Set up first on a GPU node, so that .venv holds the CUDA build of torch (or with
# TORCH_BUILD=cuda on a login node without GPUs): a job that has GPUs but a CPU torch stops.
# Compute nodes are assumed offline: HF_HUB_OFFLINE=1 (the model and tokenizer come from
# HF_HOME, filled on the login node; README "GPU clusters"); both can be set when submitting.
#
# Signals: Slurm sends USR1 120 s before the time limit (--signal): every rank checkpoints
# and exits 0, and this script requeues the job, which resumes from those checkpoints.
# SIGTERM (scancel, preemption, the hard limit) ends the ranks at once; a requeued job
# then resumes from the latest periodic checkpoint (checkpoint.every).
#
# NCCL is left at its defaults. When a multi-node job hangs at start-up or is slow,
# export before sbatch (sbatch passes the environment on), e.g.:
#   NCCL_DEBUG=INFO              log NCCL's set-up: transports chosen, interfaces, errors
#   NCCL_SOCKET_IFNAME=ib0       the interface for NCCL's sockets (e.g. ib0, eth0; ^lo,docker0 excludes)
#   NCCL_IB_DISABLE=1            no InfiniBand (when IB is absent or broken; sockets are slower)
#   NCCL_IB_HCA=mlx5             which InfiniBand adapters to use
#   NCCL_P2P_DISABLE=1           no GPU peer-to-peer within a node (a broken PCIe/NVLink set-up)
#SBATCH --job-name=dist_xqa
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8      # one task per GPU
#SBATCH --gres=gpu:8             # GPUs per node (--gres=none on CPU nodes)
#SBATCH --cpus-per-task=8        # CPU cores per task
#SBATCH --requeue                # a requeued (preempted, resubmitted) job resumes from its checkpoints
#SBATCH --signal=USR1@120        # USR1 to every task 120 s before the time limit
#SBATCH --output=slurm-%j.out
#SBATCH --open-mode=append       # a requeued job adds to its log instead of replacing it
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
export PATH="$PWD/.venv/bin:$PATH"
[ -x .venv/bin/python ] || { echo "dist_xqa: run scripts/setup.sh first" >&2; exit 1; }

# A job with GPUs must train on them: a CPU build of torch would run it on the CPUs.
job_gpus=${SLURM_GPUS_ON_NODE:-${SLURM_JOB_GPUS:-}}
cuda_devices=$(python -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')
if [ -n "$job_gpus" ] && [ "$job_gpus" != 0 ] && [ "$cuda_devices" = 0 ]; then
  echo "dist_xqa: job $SLURM_JOB_ID has GPUs ($job_gpus) but .venv's torch sees none" \
       "($(python -c 'import torch; print(torch.__version__)')): set up on a GPU node" \
       "(rm -rf .venv; bash scripts/setup.sh) or with TORCH_BUILD=cuda" >&2
  exit 1
fi

export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export HF_HOME=${HF_HOME:-$HOME/.cache/huggingface}
# Build caches on each node's own disk: the Triton kernels and any torch extension (on CPU
# nodes DeepSpeed's shared-memory op) are compiled under a file lock, which every rank of
# every node would otherwise wait on in one folder of a network home. Per user, not per job:
# a node then builds once for all of the user's jobs. TMPDIR, when set, says where.
node_cache=${TMPDIR:-/tmp}/dist_xqa-${USER:-$(id -un)}
export TORCH_EXTENSIONS_DIR=$node_cache/torch_extensions
export TRITON_CACHE_DIR=$node_cache/triton
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}  # set DS_CONFIG when submitting for another ZeRO stage
echo "dist_xqa: job ${SLURM_JOB_ID:-?}: ${SLURM_NTASKS:-?} task(s) on ${SLURM_JOB_NODELIST:-?}," \
     "$cuda_devices GPU(s) seen on $(hostname -s); $DS_CONFIG; HF_HUB_OFFLINE=$HF_HUB_OFFLINE HF_HOME=$HF_HOME;" \
     "build caches under $node_cache"

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
