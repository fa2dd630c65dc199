#!/usr/bin/env bash
# Compiles the CPU sources for aarch64 (Graviton, Ampere, Apple silicon under Linux) with a cross
# compiler from the distribution's packages, like check_cuda_build.sh for the CUDA sources. It catches
# code that only builds on x86 (intrinsics outside the AVX2 / AVX-512 copies, x86-only headers or
# builtins). Then it runs the hand-written NEON code under qemu-aarch64 (user-mode emulation) against
# the scalar code, bit for bit (scripts/run_neon_bit_identity.sh): the kernels themselves need torch
# for aarch64 and are only compiled here.
#
# Headers: torch's C++ headers are architecture-neutral apart from ATen's vector headers, which pick
# NEON from the compiler's own macros (__aarch64__), so the x86 torch in the venv serves. module.cpp
# (the Python binding, which needs the aarch64 Python's pyconfig.h) is left out: it holds no kernel.
#
# Usage: scripts/check_aarch64_build.sh [python]   (default: .venv/bin/python, a torch install)
# The cross compiler (aarch64-linux-gnu-g++, Debian/Ubuntu package g++-aarch64-linux-gnu) and the
# emulator (qemu-aarch64, package qemu-user) are installed with apt-get when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
CXX=${AARCH64_CXX:-aarch64-linux-gnu-g++}
QEMU=${AARCH64_QEMU:-qemu-aarch64}

apt_updated=0
install_package() {  # install_package <command> <package>: when the command is missing
  if command -v "$1" >/dev/null 2>&1; then return; fi
  echo "== $1 not found: installing $2"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  if [ $apt_updated -eq 0 ]; then $SUDO apt-get update -q; apt_updated=1; fi
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$2"
}
install_package "$CXX" g++-aarch64-linux-gnu
install_package "$QEMU" qemu-user

mapfile -t TORCH_INCLUDES < <("$PY" -c "from torch.utils.cpp_extension import include_paths
for p in include_paths(): print('-I' + p)")
# The same flags as setup.py's CPU build, without the x86-only ones (there are none: it is portable).
FLAGS=(-std=c++17 -O1 -fPIC -fopenmp -fno-math-errno -fno-trapping-math -ffp-contract=off
       -D_GLIBCXX_USE_CXX11_ABI=1 -DTORCH_EXTENSION_NAME=_C -Icsrc/include "${TORCH_INCLUDES[@]}")
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
"$CXX" --version | head -1
status=0
for src in csrc/ops.cpp csrc/cpu/*.cpp csrc/cpu/isa/*.cpp; do
  if "$CXX" "${FLAGS[@]}" -c "$src" -o "$OUT/$(echo "$src" | tr / _).o" 2> "$OUT/log"; then
    echo "ok      $src"
  else
    echo "FAILED  $src"; cat "$OUT/log"; status=1
  fi
done
[ $status -eq 0 ] && echo "== aarch64 compile check passed (${CXX})"

echo "== NEON against scalar, bit for bit, under ${QEMU}"
if AARCH64_CXX="$CXX" AARCH64_QEMU="$QEMU" bash scripts/run_neon_bit_identity.sh; then
  echo "== NEON bit-identity check passed"
else
  echo "FAILED  NEON bit-identity check"; status=1
fi
exit $status
