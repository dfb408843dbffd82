#!/usr/bin/env bash
# Submit with: sbatch slurm/train_lbmrc.sh [--config configs/xquad.yaml] [key=value ...]
# One task per GPU; srun starts every rank of the one torch.distributed world (the
# trainer reads SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID and the first node's address).
#SBATCH --job-name=dist_xqa
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --output=slurm-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
export PATH="$PWD/.venv/bin:$PATH"
[ -x .venv/bin/python ] || { echo "run scripts/setup.sh first" >&2; exit 1; }
if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  export DS_ACCELERATOR=cpu
fi
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n 1 || echo localhost)}
export MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
srun python dist_xqa/train.py --deepspeed "$DS_CONFIG" "$@"
