"""The hand-written NEON code (aarch64) against the portable scalar code, bit for bit, on an emulated
aarch64 CPU: tests/native/neon_bit_identity.cpp, cross-compiled and run under qemu-aarch64 by
scripts/run_neon_bit_identity.sh. Runs wherever the cross compiler and the emulator are installed
(`make aarch64-build-check` installs both), whatever this machine's own CPU; skipped otherwise."""
from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CXX = os.environ.get("AARCH64_CXX", "aarch64-linux-gnu-g++")
QEMU = os.environ.get("AARCH64_QEMU", "qemu-aarch64")


def _missing_tools() -> list:
    return [tool for tool in (CXX, QEMU) if shutil.which(tool) is None]


@pytest.mark.skipif(bool(_missing_tools()), reason=f"needs {CXX} and {QEMU} (packages g++-aarch64-linux-gnu, "
                                                   f"qemu-user): missing {_missing_tools()}")
def test_neon_code_matches_scalar_bit_for_bit_under_emulation():
    run = subprocess.run(["bash", str(ROOT / "scripts" / "run_neon_bit_identity.sh")], capture_output=True,
                         text=True, timeout=600)
    report = run.stdout + run.stderr
    assert run.returncode == 0, report
    counts = re.search(r"(\d+) comparisons, (\d+) mismatches", run.stdout)
    assert counts is not None, report
    assert int(counts.group(1)) > 0 and int(counts.group(2)) == 0, report
