#!/usr/bin/env bash
# The checks for the day a GPU is lent, in one script, from a fresh clone on one GPU:
#   1 setup         bash scripts/setup.sh: the CUDA build of torch (pip must reach its
#                   indexes: about 3 GB of wheels the first time)
#   2 gpu_info      nvidia-smi, and torch.cuda as the venv sees it (device, capability,
#                   bf16, memory) with a bf16 matrix product on the device
#   3 kernel_tests  pytest tests/test_kernel_*.py -m 'not slow': the Triton kernels compiled
#                   for the device (TRITON_INTERPRET unset), the gpu-marked tests included
#   4 kernel_bench  python benchmarks/kernels.py: writes benchmarks/results/kernels.json
#   5 demo          bash scripts/demo.sh on the GPU, its run directory under ${TMPDIR:-/tmp}
# Each step runs whatever an earlier one did, under a time limit (exit status 124 when it
# ran past it). Everything measured goes to benchmarks/results/gpu_check/: <step>.log,
# steps.tsv (step, exit status, seconds), run.txt (commit, host, date), kernel_tests.xml
# (each test's result), demo_summary.json and demo_rank0.log (the demo's scores and log);
# the kernel benchmark's own file is benchmarks/results/kernels.json.
# Exit status: 0 when every step passed, 1 when any failed, 3 when there is no GPU.
#
#   bash scripts/gpu_check.sh [--force]
#
# Without a GPU (no nvidia-smi on PATH, or one that fails) it refuses and changes nothing;
# --force runs the steps anyway (the GPU ones then fail, which is what they are for).
set -euo pipefail
cd "$(dirname "$0")/.."

force=0
for arg in "$@"; do
  case $arg in
    --force) force=1 ;;
    *) echo "gpu_check: unknown argument '$arg' (usage: bash scripts/gpu_check.sh [--force])" >&2; exit 2 ;;
  esac
done
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  if [ "$force" = 0 ]; then
    echo "gpu_check: no GPU here (nvidia-smi is missing or fails): these checks need one." \
         "Nothing was run or written; --force runs them anyway." >&2
    exit 3
  fi
  echo "gpu_check: no GPU here (nvidia-smi is missing or fails); --force: running the steps anyway" >&2
fi

RESULTS=benchmarks/results/gpu_check
DEMO_RUN=${TMPDIR:-/tmp}/dist_xqa-gpu-check-demo
export VENV=${VENV:-.venv}
export PY=$VENV/bin/python
# The kernels must compile for the device: an interpreter left on from CPU work would hide it.
unset TRITON_INTERPRET
rm -rf "$RESULTS" "$DEMO_RUN"
mkdir -p "$RESULTS"
{
  echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (with local changes)')"
  echo "host $(hostname)"
  echo "started $(date -u +%Y-%m-%dT%H:%M:%SZ)"
} >"$RESULTS/run.txt"
printf 'step\texit_status\tseconds\n' >"$RESULTS/steps.tsv"

failed=()
step() {  # name, time limit in seconds, bash command
  local name=$1 limit=$2 command=$3 start=$SECONDS rc=0
  echo "gpu_check: $name (limit ${limit}s) ..."
  timeout --kill-after=30 "$limit" bash -c "$command" >"$RESULTS/$name.log" 2>&1 || rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >>"$RESULTS/steps.tsv"
  echo "gpu_check: $name: exit status $rc after $((SECONDS - start))s ($RESULTS/$name.log)"
  if [ "$rc" != 0 ]; then failed+=("$name"); fi
}

step setup 420 'bash scripts/setup.sh'
step gpu_info 120 'nvidia-smi && nvidia-smi -L && "$PY" - <<"EOF"
import torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version())
assert torch.cuda.is_available(), "torch sees no CUDA device"
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"device {i}: {p.name}, capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB, "
          f"{p.multi_processor_count} SMs, bf16 {torch.cuda.is_bf16_supported()}")
a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
b = a @ a  # warm-up: cuBLAS picks its kernel
torch.cuda.synchronize()
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
start.record()
for _ in range(10):
    b = a @ a
end.record()
torch.cuda.synchronize()
ms = start.elapsed_time(end) / 10
print(f"bf16 matmul 4096^3: {ms:.3f} ms, {2 * 4096**3 / ms / 1e9:.0f} TFLOP/s")
EOF'
step kernel_tests 300 "\"\$PY\" -m pytest tests/test_kernel_*.py -m 'not slow' -rs -v --junitxml=$RESULTS/kernel_tests.xml"
step kernel_bench 300 '"$PY" benchmarks/kernels.py --out benchmarks/results/kernels.json'
step demo 420 "bash scripts/demo.sh run_dir=$DEMO_RUN"
cp "$DEMO_RUN/eval/summary.json" "$RESULTS/demo_summary.json" 2>/dev/null || true
cp "$DEMO_RUN/logs/rank0.log" "$RESULTS/demo_rank0.log" 2>/dev/null || true

echo "finished $(date -u +%Y-%m-%dT%H:%M:%SZ)" >>"$RESULTS/run.txt"
column -t "$RESULTS/steps.tsv" 2>/dev/null || cat "$RESULTS/steps.tsv"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "gpu_check: failed: ${failed[*]} (logs in $RESULTS/)" >&2
  exit 1
fi
echo "gpu_check: every step passed ($RESULTS/)"
