"""The shared kernel headers (csrc/include/unlearn/) compile without warnings about pragmas for both
compilers that read them: the host C++ compiler (every CPU translation unit includes them) and nvcc
(the CUDA kernels do). A pragma one compiler does not know is ignored by it, with only a warning,
so a loop meant to be unrolled would silently not be. Compiles the headers that need no torch
headers (the others only add ATen glue), each in a translation unit of its own; seconds."""
from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess

import pytest

INCLUDE = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "include"
CXX = os.environ.get("CXX", "c++")


def _nvcc_places() -> list:
    """Where nvcc may be, in the order torch's extension builder looks: $CUDA_HOME/bin, PATH, then
    /usr/local/cuda/bin."""
    places = [os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")] if os.environ.get("CUDA_HOME") else []
    return places + [shutil.which("nvcc") or "nvcc on PATH", "/usr/local/cuda/bin/nvcc"]


NVCC = next((p for p in _nvcc_places() if os.path.isfile(p) and os.access(p, os.X_OK)), None)


def _needs_torch(header: pathlib.Path, seen=()) -> bool:
    text = header.read_text()
    if re.search(r"#include <(ATen|c10|torch)/", text):
        return True
    return any(_needs_torch(INCLUDE / name, seen + (header.name,))
               for name in re.findall(r'#include "(unlearn/[^"]+)"', text) if pathlib.Path(name).name not in seen)


HEADERS = sorted(h.name for h in (INCLUDE / "unlearn").glob("*.h") if not _needs_torch(h))


def _unit(header: str) -> str:
    """A translation unit of the header alone: it must include what it uses itself."""
    return f'#include "unlearn/{header}"\n'


def test_the_torch_free_headers_include_those_with_unroll_pragmas():
    assert {"philox.h", "codecs.h"} <= set(HEADERS), HEADERS


@pytest.mark.skipif(shutil.which(CXX) is None, reason=f"needs a host C++ compiler ({CXX})")
@pytest.mark.parametrize("header", HEADERS)
def test_header_compiles_on_the_host_without_unknown_pragmas(header, tmp_path):
    source = tmp_path / "unit.cpp"
    source.write_text(_unit(header))
    run = subprocess.run([CXX, "-std=c++17", "-O3", "-fsyntax-only", "-Wall", "-Werror=unknown-pragmas",
                          f"-I{INCLUDE}", str(source)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "pragma" not in run.stderr, run.stderr


@pytest.mark.skipif(NVCC is None, reason=f"needs nvcc: none at {', '.join(_nvcc_places())}")
def test_headers_compile_with_nvcc_without_warnings(tmp_path):
    """Both of nvcc's passes: the device code (nvcc's front end warns on pragmas it does not know)
    and the host code, which nvcc hands to the host compiler with the pragmas it accepted."""
    source = tmp_path / "unit.cu"
    source.write_text("".join(_unit(h) for h in HEADERS))
    run = subprocess.run([NVCC, "-std=c++17", "-c", "-Werror", "all-warnings", "-Xcompiler",
                          "-Wall,-Werror=unknown-pragmas", f"-I{INCLUDE}", str(source), "-o",
                          str(tmp_path / "unit.o")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "pragma" not in run.stderr, run.stderr
