#!/usr/bin/env bash
# One command for a GPU machine (e.g. the lent H100/H200, which has its own torch, nvcc and
# compute-sanitizer but no network): build in place, run the CUDA tests against the CPU kernels and
# the reference, run compute-sanitizer, run the GPU benchmarks. Logs go to the folder given as $1.
# Every stage runs even if an earlier one failed; the exit code says whether all passed.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${1:-gpu-logs}
mkdir -p "$LOG"
PY=${PYTHON:-python3}
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
failed=()
stage() {  # stage NAME COMMAND...
  local name=$1; shift
  echo "== $name: $*" | tee -a "$LOG/summary.txt"
  if "$@" >"$LOG/$name.log" 2>&1; then echo "   ok" | tee -a "$LOG/summary.txt"
  else echo "   FAILED (see $LOG/$name.log)" | tee -a "$LOG/summary.txt"; failed+=("$name"); fi
}
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; $PY -c "import torch; print(torch.__version__, torch.version.cuda)"; } >"$LOG/machine.txt" 2>&1
missing=$($PY - <<'PYEOF'
import importlib.util
print(" ".join(m for m in ("pytest", "hypothesis", "scipy", "numpy", "pytest_benchmark", "sklearn") if importlib.util.find_spec(m) is None))
PYEOF
)
[ -n "$missing" ] && echo "missing Python packages (stages needing them will fail): $missing" | tee -a "$LOG/summary.txt"
stage build env UNLEARN_EXT_CUDA=1 MAX_JOBS=16 $PY setup.py build_ext --inplace
stage cuda_smoke $PY scripts/cuda_smoke.py
stage tests_cuda $PY -m pytest tests -q -m cuda
stage tests_all $PY -m pytest tests -q
if command -v compute-sanitizer >/dev/null; then
  stage sanitizer_memcheck compute-sanitizer --tool memcheck --error-exitcode 1 $PY scripts/cuda_smoke.py
  stage sanitizer_racecheck compute-sanitizer --tool racecheck --error-exitcode 1 $PY scripts/cuda_smoke.py
else
  echo "compute-sanitizer not found" | tee -a "$LOG/summary.txt"; failed+=("sanitizer")
fi
stage bench_cuda env UNLEARN_BENCH_DEVICE=cuda UNLEARN_BENCH_JSON="$LOG/bench_cuda.json" $PY -m pytest benchmarks -q --benchmark-only
echo "failed stages: ${failed[*]:-none}" | tee -a "$LOG/summary.txt"
[ ${#failed[@]} -eq 0 ]
