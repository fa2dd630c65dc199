#!/usr/bin/env bash
# Runs the hand-written NEON code on an emulated aarch64 CPU and compares it bit for bit with the
# portable scalar code (tests/native/neon_bit_identity.cpp: no torch, raw buffers). The program is
# cross-compiled statically with the kernels' own optimization and floating-point flags (setup.py)
# and run under qemu-aarch64 (user-mode emulation), so no aarch64 machine is needed. Emulation says
# nothing about speed.
#
# Usage: scripts/run_neon_bit_identity.sh
# Needs aarch64-linux-gnu-g++ (package g++-aarch64-linux-gnu) and qemu-aarch64 (package qemu-user);
# scripts/check_aarch64_build.sh installs both when missing. Exit status: the test program's.
set -euo pipefail
cd "$(dirname "$0")/.."
CXX=${AARCH64_CXX:-aarch64-linux-gnu-g++}
QEMU=${AARCH64_QEMU:-qemu-aarch64}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
"$CXX" -std=c++17 -O3 -fno-math-errno -fno-trapping-math -ffp-contract=off -Wall -Wno-unknown-pragmas -static \
  -Icsrc/include -Icsrc/cpu tests/native/neon_bit_identity.cpp csrc/cpu/smoothing_mc_scalar.cpp \
  csrc/cpu/smoothing_mc_neon.cpp -o "$OUT/neon_bit_identity"
"$QEMU" "$OUT/neon_bit_identity"
