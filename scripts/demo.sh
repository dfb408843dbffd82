#!/usr/bin/env bash
# The main job on the embedded default: set up (first time only), then run the whole
# LBMRC pipeline (teachers, streamed distillation, evaluation) on the demo corpus.
# On a machine without GPUs it runs 2 CPU ranks; with GPUs, one rank per GPU.
# Extra arguments go to dist_xqa/train.py (e.g. --config configs/xquad.yaml key=value).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"  # the venv's ninja builds DeepSpeed's CPU op
if python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  exec deepspeed dist_xqa/train.py --deepspeed ds_configs/zero2.json "$@"
fi
export DS_ACCELERATOR=cpu
exec deepspeed --num_gpus 2 dist_xqa/train.py --deepspeed ds_configs/zero2.json "$@"
