#!/usr/bin/env bash
# GPU verification of unlearn_ext on a machine that has its own CUDA torch, nvcc and
# compute-sanitizer. Installs nothing: it builds the extension in place with that machine's python3,
# then runs the CUDA smoke test (every op, CUDA vs CPU), the CUDA-marked tests, the whole test suite,
# compute-sanitizer (memcheck, racecheck, synccheck) on the smoke test, and the benchmarks on CUDA.
#
# Usage: scripts/gpu_check.sh LOGDIR
#   GPU_CHECK_STAGES="env build smoke cuda_tests all_tests memcheck racecheck synccheck bench"
#                      stages to run (default: all, in that order). Where one command may run only
#                      10 minutes, split: "env build smoke cuda_tests", then the rest (the in-place
#                      build is reused when the build stage is left out).
#   GPU_CHECK_TIMEOUT  seconds allowed per stage (default 900)
#   PYTHON             interpreter (default python3)
# Every stage writes LOGDIR/<stage>.log; LOGDIR/summary.txt lists PASS/FAIL/SKIP per stage. A
# failing stage does not stop the next ones; the exit status is 1 if any stage failed.
set -euo pipefail

if [ $# -lt 1 ]; then
  echo "usage: $0 LOGDIR" >&2
  exit 2
fi
mkdir -p "$1"
LOGDIR=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."
REPO=$(pwd)
PYTHON=${PYTHON:-python3}
STAGES=${GPU_CHECK_STAGES:-"env build smoke cuda_tests all_tests memcheck racecheck synccheck bench"}
STAGE_TIMEOUT=${GPU_CHECK_TIMEOUT:-900}
SUMMARY="$LOGDIR/summary.txt"
: >"$SUMMARY"
failed=0

export REPO PYTHON LOGDIR
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# CUDA_HOME: as given, else the toolkit of the nvcc on PATH (`dirname $(dirname $(which nvcc))`,
# following links; a wrapper script in /usr/local/bin is skipped), else /usr/local/cuda.
find_cuda_home() {
  local nvcc cand
  nvcc=$(command -v nvcc 2>/dev/null || true)
  for cand in ${nvcc:+"$(dirname "$(dirname "$nvcc")")" "$(dirname "$(dirname "$(readlink -f "$nvcc")")")"} /usr/local/cuda; do
    if [ -x "$cand/bin/nvcc" ] && [ -f "$cand/include/cuda_runtime.h" ]; then
      echo "$cand"
      return 0
    fi
  done
  return 1
}
if [ -z "${CUDA_HOME:-}" ]; then CUDA_HOME=$(find_cuda_home || true); fi
if [ -n "${CUDA_HOME:-}" ]; then
  export CUDA_HOME
  export PATH="$CUDA_HOME/bin:$PATH"
fi
SANITIZER=$(command -v compute-sanitizer 2>/dev/null || true)
if [ -z "$SANITIZER" ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/compute-sanitizer/compute-sanitizer" ]; then
  SANITIZER="$CUDA_HOME/compute-sanitizer/compute-sanitizer"
fi
export SANITIZER

wanted() { case " $STAGES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

has_module() { "$PYTHON" -c "import $1" >/dev/null 2>&1; }

record() {  # record STAGE STATUS DETAIL
  printf '%-10s %-4s %s\n' "$1" "$2" "$3" | tee -a "$SUMMARY"
  if [ "$2" = FAIL ]; then failed=1; fi
}

# run_stage NAME CMD...: runs CMD with a timeout, output to LOGDIR/NAME.log, records the result.
run_stage() {
  local name=$1
  shift
  if ! wanted "$name"; then
    record "$name" SKIP "not in GPU_CHECK_STAGES"
    return 0
  fi
  local log="$LOGDIR/$name.log" start rc
  start=$(date +%s)
  echo "== $name: $*" | tee "$log"
  set +e
  if declare -F "$1" >/dev/null; then  # a shell function: run it in a child bash under the timeout
    timeout --kill-after=30 "$STAGE_TIMEOUT" bash -c 'set -eo pipefail; "$@"' _ "$@" >>"$log" 2>&1
  else
    timeout --kill-after=30 "$STAGE_TIMEOUT" "$@" >>"$log" 2>&1
  fi
  rc=$?
  set -e
  local took=$(( $(date +%s) - start ))
  if [ $rc -eq 0 ]; then
    record "$name" PASS "${took}s"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    record "$name" FAIL "timed out after ${took}s (see $name.log)"
  else
    record "$name" FAIL "exit $rc after ${took}s (see $name.log)"
  fi
  tail -n 5 "$log" | sed 's/^/    /'
  return 0
}

skip_stage() { if wanted "$1"; then record "$1" SKIP "$2"; fi; }

# ---- env: what this machine has (never fails the run by itself) -----------------------------------
env_report() {
  echo "date: $(date -u)"
  echo "repo: $REPO ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no git'))"
  nvidia-smi || echo "nvidia-smi: not available"
  echo "CUDA_HOME=${CUDA_HOME:-unset}"
  nvcc --version || echo "nvcc: not found"
  echo "compute-sanitizer: ${SANITIZER:-not found}"
  "$PYTHON" - <<'EOF'
import importlib, sys
import torch
print("python", sys.version.split()[0])
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
for mod in ("numpy", "scipy", "pytest", "hypothesis", "pytest_benchmark", "sklearn", "ninja", "setuptools"):
    try:
        m = importlib.import_module(mod)
        print(f"module {mod}: {getattr(m, '__version__', 'present')}")
    except Exception as exc:
        print(f"module {mod}: MISSING ({type(exc).__name__})")
EOF
}
export -f env_report
run_stage env env_report
for mod in pytest hypothesis scipy pytest_benchmark sklearn ninja; do
  if ! has_module "$mod"; then
    echo "note: python module '$mod' is missing (nothing is installed from the network)" | tee -a "$SUMMARY"
  fi
done

# ---- build in place ---------------------------------------------------------------------------------
build() {
  rm -f unlearn_ext/_C*.so
  UNLEARN_EXT_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    "$PYTHON" setup.py build_ext --inplace
  "$PYTHON" -c "import unlearn_ext as ue; print(ue.build_info()); assert ue.cuda_built(), 'no CUDA kernels in the build'"
}
export -f build
if [ -z "${CUDA_HOME:-}" ]; then
  record build FAIL "nvcc not found"
else
  run_stage build build
fi
built=0
if "$PYTHON" -c "import unlearn_ext as ue, sys; sys.exit(0 if ue.cuda_built() else 1)" >/dev/null 2>&1; then
  built=1
fi

# ---- smoke: every op, CUDA against CPU ------------------------------------------------------------
if [ $built -eq 1 ]; then
  run_stage smoke "$PYTHON" scripts/cuda_smoke.py
else
  skip_stage smoke "no CUDA build"
fi

# ---- tests ------------------------------------------------------------------------------------------
if [ $built -eq 1 ] && has_module pytest; then
  run_stage cuda_tests "$PYTHON" -m pytest tests -m cuda -q -p no:cacheprovider
  run_stage all_tests "$PYTHON" -m pytest tests -q -p no:cacheprovider
else
  skip_stage cuda_tests "no CUDA build or pytest missing"
  skip_stage all_tests "no CUDA build or pytest missing"
fi

# ---- compute-sanitizer --------------------------------------------------------------------------
# The caching allocator would hide out-of-bounds accesses inside its large blocks: disable it.
sanitize() {  # sanitize TOOL [sanitizer options]
  local tool=$1
  shift
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" --error-exitcode 99 \
    "$@" "$PYTHON" scripts/cuda_smoke.py --small
}
export -f sanitize
if [ $built -eq 1 ] && [ -n "$SANITIZER" ]; then
  run_stage memcheck sanitize memcheck --leak-check no
  run_stage racecheck sanitize racecheck
  run_stage synccheck sanitize synccheck
else
  for s in memcheck racecheck synccheck; do skip_stage "$s" "no CUDA build or compute-sanitizer missing"; done
fi

# ---- benchmarks ---------------------------------------------------------------------------------
bench() {
  UNLEARN_BENCH_DEVICE=cuda "$PYTHON" -m pytest benchmarks -q -p no:cacheprovider --benchmark-only
  if [ -f benchmarks/last_run.json ]; then cp benchmarks/last_run.json "$LOGDIR/bench_last_run.json"; fi
}
export -f bench
if [ ! -d benchmarks ]; then
  skip_stage bench "no benchmarks directory"
elif [ $built -eq 1 ] && has_module pytest && has_module pytest_benchmark; then
  run_stage bench bench
else
  skip_stage bench "no CUDA build, or pytest / pytest-benchmark missing"
fi

echo "== summary (also in $SUMMARY)"
cat "$SUMMARY"
if [ $failed -ne 0 ]; then
  echo "gpu_check: FAILED" | tee -a "$SUMMARY"
  exit 1
fi
echo "gpu_check: OK" | tee -a "$SUMMARY"
