#!/usr/bin/env bash
# The one-call GPU check. On a GPU machine with torch preinstalled (no internet needed):
#   bash benchmarks/gpu_check.sh [RESULTS_DIR]        # default: $OUT, else benchmarks/results/gpu_check
# builds the extension, runs the CUDA tests, compute-sanitizer (memcheck, racecheck) on small cases
# and the GPU benchmarks; logs, JSON and markdown go to RESULTS_DIR, with summary.txt listing each
# step's exit code and seconds. Every step runs even if an earlier one fails.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-${OUT:-benchmarks/results/gpu_check}}
mkdir -p "$RESULTS"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} PKA_REQUIRE_CUDA=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
PY=${PYTHON:-python3}  # the device image has python3 (holding torch), not necessarily python
SAN=${COMPUTE_SANITIZER:-compute-sanitizer}
: > "$RESULTS/summary.txt"

step() {
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "== $name: $*"
  timeout "$limit" "$@" > "$RESULTS/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$RESULTS/summary.txt"
  tail -n 5 "$RESULTS/$name.log"
}

(nvidia-smi; $PY -c "import torch; print(torch.__version__, torch.version.cuda)") > "$RESULTS/machine.txt" 2>&1
step build 240 $PY -m pip install --no-build-isolation --no-deps -e .
step tests 240 $PY -m pytest -q -p no:cacheprovider tests/test_cuda_fused.py tests/test_cuda.py \
  --junitxml="$RESULTS/junit.xml"
step memcheck 120 "$SAN" --tool memcheck --error-exitcode 9 $PY benchmarks/sanitize_case.py --small
step racecheck 120 "$SAN" --tool racecheck --error-exitcode 9 $PY benchmarks/sanitize_case.py --small
step bench_op 180 $PY benchmarks/bench_gpu.py --out "$RESULTS"
step bench_train 120 $PY benchmarks/bench_train_step.py --device cuda --repeats 30 --out "$RESULTS"
step bench_train_amp 120 $PY benchmarks/bench_train_step.py --device cuda --amp --repeats 30 --out "$RESULTS"
cat "$RESULTS/summary.txt"
