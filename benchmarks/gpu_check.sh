#!/usr/bin/env bash
# The one-call GPU check. On a GPU machine with torch preinstalled (no internet needed):
#   bash benchmarks/gpu_check.sh [RESULTS_DIR]        # default: $OUT, else benchmarks/results/gpu_check
# builds the extension, runs the CUDA tests (and, if some fail, reruns them under each kernel
# switch: benchmarks/triage_failures.py), compute-sanitizer (memcheck, racecheck) on small cases,
# the GPU benchmarks, an Nsight Compute profile of the headline kernels and their instruction mix
# (cuobjdump). Every step runs even if an earlier one fails (except that nothing runs after a
# failed build), each within its own limit and all within PKA_GPU_CHECK_BUDGET seconds (default
# 450), so the script ends, with its results written, before a caller's time limit (the device
# tool: 10 minutes a call, 15 a session). The steps run in order of what a run is for: the
# tests, the sanitizers and the benchmarks first, diagnostics of failures last.
#
# RESULTS_DIR receives two files, rewritten after every step so that a check cut off from outside
# still leaves what it finished: summary.txt (each step's exit code and seconds) and gpu_check.tar.gz
# (machine.txt, every step's log, junit.xml, the benchmarks' JSON and markdown). Two files, because
# the device tool returns at most eight. To commit: unpack into benchmarks/results/gpu/ and run
# benchmarks/speed_report.py.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-${OUT:-benchmarks/results/gpu_check}}
BUDGET=${PKA_GPU_CHECK_BUDGET:-450}
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
WORK=$(mktemp -d /tmp/pka_gpu_check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT  # everything worth keeping is in the archive
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} PKA_REQUIRE_CUDA=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}  # the device image has python3 (holding torch), not necessarily python
SAN=${COMPUTE_SANITIZER:-compute-sanitizer}
# Seconds on the check's clock: bash's, or (tests/test_gpu_check_script.py) a file its stand-in
# steps advance, so that the budget's bookkeeping is tested without waiting.
now() {
  if [ -n "${PKA_GPU_CHECK_CLOCK:-}" ]; then cat "$PKA_GPU_CHECK_CLOCK"; else echo "$SECONDS"; fi
}
START=$(now)

pack() {
  cp "$WORK/summary.txt" "$RESULTS/summary.txt"
  tar -czf "$RESULTS/gpu_check.tar.gz.part" -C "$WORK" . && mv "$RESULTS/gpu_check.tar.gz.part" "$RESULTS/gpu_check.tar.gz"
}

# step NAME LIMIT CMD...: runs CMD for at most LIMIT seconds and never past the budget. At the
# limit CMD gets SIG (default TERM; INT lets pytest write its report of what finished), and
# KILL GRACE seconds later (default 10) if it is still running. CMD finds the limit it runs under
# in PKA_STEP_LIMIT (triage_failures.py sets its deadline by it). The exit code is left in RC.
RC=0
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - ($(now) - START)))
  ((limit > left)) && limit=$left
  if ((limit < 15)); then
    echo "$name skipped (budget of ${BUDGET}s spent)" | tee -a "$WORK/summary.txt"
    pack
    RC=125
    return
  fi
  local t0
  t0=$(now)
  echo "== $name (limit ${limit}s): $*"
  PKA_STEP_LIMIT=$limit timeout -k "${GRACE:-10}" -s "${SIG:-TERM}" "$limit" "$@" > "$WORK/$name.log" 2>&1
  RC=$?
  echo "$name rc=$RC $(($(now) - t0))s" | tee -a "$WORK/summary.txt"
  tail -n 5 "$WORK/$name.log"
  pack
}

: > "$WORK/summary.txt"
machine() {
  date -u; uname -r; timeout 20 nvidia-smi
  timeout 60 $PY -c "import torch; print(torch.__version__, torch.version.cuda, 'cuda available:', torch.cuda.is_available())"
  echo "tree: $(git rev-parse HEAD 2>/dev/null || echo 'no git metadata')$(git status --porcelain 2>/dev/null | grep -q . && echo ' + uncommitted changes')"
  gcc --version | head -n 1
  for tool in nvcc ninja cuobjdump ncu compute-sanitizer cuda-gdb; do echo "$tool: $(command -v $tool || echo missing)"; done
  # The toolchain settings an extension build inherits (the 2026-11-28 crash pointed at a copy of
  # libstdc++ inside the extension).
  $PY -c "import sysconfig as s; [print(k, '=', s.get_config_var(k)) for k in ('CC', 'CXX', 'LDSHARED', 'LDFLAGS', 'CFLAGS')]"
  env | grep -E '^(CC|CXX|CFLAGS|CXXFLAGS|LDFLAGS|CPPFLAGS)='
}
machine > "$WORK/machine.txt" 2>&1
pack
# Eight workers with two CPU threads each: the float64 comparisons against the CPU op are CPU-bound
# (they took 344 of the 557 test-seconds on 2026-11-28, when 4 workers needed 156 s of the step's
# 180).
XDIST=()
$PY -c "import xdist" 2>/dev/null && XDIST=(-n 8)
# A hung test then costs its worker, not the whole step (pytest-timeout, where installed). The
# thread method: a test stuck behind a hung kernel waits inside a CUDA call, where the signal
# method's SIGALRM handler never runs; the thread ends the worker and xdist starts another.
HANG=()
$PY -c "import pytest_timeout" 2>/dev/null && HANG=(--timeout 120 --timeout-method thread)
step build 240 $PY -m pip install -v --no-build-isolation --no-deps -e .  # -v: the compile and link lines
if ((RC != 0)); then  # every later step would only fail on the missing library
  echo "total $(($(now) - START))s (build failed: no further steps)" | tee -a "$WORK/summary.txt"
  pack
  tail -n 30 "$WORK/build.log"
  exit 0
fi
# GRACE=20: after SIGINT, xdist waits up to 10 s for a worker stuck in a CUDA call before the
# junit report is written; KILL at 10 s would lose the report.
SIG=INT GRACE=20 step tests 240 env OMP_NUM_THREADS=2 $PY -m pytest -q -p no:cacheprovider "${XDIST[@]}" "${HANG[@]}" \
  tests/test_cuda_fused.py tests/test_cuda.py --junitxml="$WORK/junit.xml"
# The caching allocator would hide an access past a buffer that stays inside its pooled block.
step memcheck 60 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool memcheck --error-exitcode 9 $PY benchmarks/sanitize_case.py --short
step racecheck 90 "$SAN" --tool racecheck --error-exitcode 9 $PY benchmarks/sanitize_case.py --small
step bench_op 120 $PY benchmarks/bench_gpu.py --out "$WORK"
step bench_train 60 $PY benchmarks/bench_train_step.py --device cuda --repeats 30 --out "$WORK"
step bench_train_amp 60 $PY benchmarks/bench_train_step.py --device cuda --amp --repeats 30 --out "$WORK"
# Diagnostics for tuning (not a target): one forward and one backward kernel of the headline shape.
step ncu 60 "${NCU:-ncu}" --clock-control none --kernel-name regex:pka_ --launch-skip 4 --launch-count 2 \
  --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
  --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis $PY benchmarks/profile_case.py
# The headline kernels' instruction mix, read from the built library (no GPU work).
step sass 30 bash benchmarks/sass_mix.sh
# The long sequences, whose launch plans move block buffers to the global workspace.
step memcheck_long 60 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool memcheck --error-exitcode 9 $PY benchmarks/sanitize_case.py --long
# Only when tests failed: the failures rerun as they were and under each kernel switch (triage.md).
# Its deadline follows the step's limit (PKA_STEP_LIMIT less 15 s), which the budget may cut below 90 s.
step triage 90 $PY benchmarks/triage_failures.py "$WORK/junit.xml" --out "$WORK"
# If a bad call of the op crashes the process (seen once: test_errors, 2026-11-28), the native
# stack of the crash, from cuda-gdb; nothing when the call raises as it should.
error_stack() {
  $PY -c "import sys; sys.path.insert(0, 'tests'); import test_cuda as t
print(t.error_script(t.ERROR_CASES['cpu_lengths_above_T'][0]))" > "$WORK/error_case.py" || return 1
  $PY "$WORK/error_case.py" && return 0
  "${CUDA_GDB:-cuda-gdb}" -q -batch -ex run -ex bt --args $PY "$WORK/error_case.py"
  # Which C++ runtime the process maps, and which std:: code the extension carries itself (the
  # 2026-11-28 stack ended in std::ostream::_M_insert<long> inside the extension).
  $PY -c "import pka_ext; print(''.join(l for l in open('/proc/self/maps') if 'stdc++' in l))"
  ldd pka_ext/_C*.so
  nm -C --defined-only pka_ext/_C*.so | grep -E "std::(basic_ostream|ostream|num_put|locale|codecvt)" | head -n 40
}
export PY WORK
export -f error_stack
step error_stack 60 bash -c error_stack
echo "total $(($(now) - START))s" | tee -a "$WORK/summary.txt"
pack
[[ -f "$WORK/triage.md" ]] && cat "$WORK/triage.md"  # the device tool's reply carries the end
cat "$RESULTS/summary.txt"
