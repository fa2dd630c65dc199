#!/usr/bin/env bash
# Compiles the CUDA sources with nvcc against a CUDA build of torch. No GPU is needed or used:
# this only proves that csrc/cuda/*.cu builds, so CUDA code that does not compile never lands.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CUDA_VENV:-.venv-cuda}
TORCH_CUDA_SPEC=${TORCH_CUDA_SPEC:-torch==2.14.1}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$PATH"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
if ! command -v nvcc >/dev/null; then
  echo "check_cuda_build: nvcc not found under CUDA_HOME=$CUDA_HOME" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch; assert torch.version.cuda" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q "$TORCH_CUDA_SPEC" numpy setuptools wheel ninja
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "check_cuda_build: compiling with $("$VENV/bin/python" -c 'import torch; print(torch.__version__)') and $(nvcc --version | tail -1)"
UNLEARN_EXT_CUDA=1 MAX_JOBS=${MAX_JOBS:-2} "$VENV/bin/python" setup.py -q build_ext \
  --build-temp "$tmp/temp" --build-lib "$tmp/lib"
so=$(find "$tmp/lib" -name '_C*.so' | head -n 1)
test -n "$so"
# The CUDA kernels must actually be in the library, registered for the CUDA dispatch key.
# (captured first: grep -q closing the pipe early would fail the pipeline under pipefail)
sections=$(readelf -S -W "$so")
echo "$sections" | grep "nv_fatbin" >/dev/null || { echo "no CUDA device code (.nv_fatbin) in $so" >&2; exit 1; }
echo "check_cuda_build: device code present: $(echo "$sections" | grep nv_fatbin | awk '{print $2, "size 0x"$6}')"
echo "check_cuda_build: OK ($so, $(du -h "$so" | cut -f1))"
