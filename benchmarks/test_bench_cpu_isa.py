"""Each CPU vector path of the hot kernels (scalar, avx2, avx512: csrc/cpu/isa.h), forced with
UNLEARN_EXT_CPU_ISA, against the same eager baselines in the same run (DESIGN section 9's targets per
ISA). Paths the CPU cannot run are skipped. Workload: 11.7M fp32 values in ResNet-18's 62 shapes.

    OMP_NUM_THREADS=1 python -m pytest benchmarks/test_bench_cpu_isa.py -q --benchmark-only -p no:cacheprovider

The ratios are printed at the end (kernel on each path vs its baseline) and kept in last_run.json.
"""
from __future__ import annotations

import os

import pytest
import torch

import unlearn_ext as ue
from unlearn_ext import ops as _ops, selection as S
from unlearn_ext.pcmu.smoothing import radius_table
from test_bench_history import BLOCK, eager_dequantize, eager_quantize
from test_bench_select import (FRACTION, double_argsort_select_reset, kernel_random_k_reset, kernel_select_reset,
                               topk_select_reset)
from test_bench_smoothing import ALPHA, N, N0, SIGMA, TAU, eager_mc
from workloads import gradient_list, run_timed

pytestmark = pytest.mark.skipif(not ue.compiled(), reason="needs the compiled extension")

PATHS = ["scalar", "avx2", "avx512"]


def _supported():
    from unlearn_ext.ops.loader import _C
    return list(_C.cpu_isas()) if _C is not None else []


@pytest.fixture(params=PATHS)
def path(request, monkeypatch, note):
    if request.param not in _supported():
        pytest.skip(f"this CPU cannot run the {request.param} path")
    monkeypatch.setenv("UNLEARN_EXT_CPU_ISA", request.param)
    assert ue.build_info()["cpu_isa"] == request.param
    note("isa/threads", torch.get_num_threads())
    note("isa/cpu_isas", _supported())
    return request.param


@pytest.fixture(scope="module")
def grads():
    return gradient_list(scale=TAU)


@pytest.fixture(scope="module")
def scores():
    return gradient_list(scale=1e-2, seed=1)


@pytest.fixture(scope="module")
def params():
    return gradient_list(scale=1e-1, seed=2)


def _numel(ts):
    return sum(t.numel() for t in ts)


def _run(benchmark, fn, rounds):
    return run_timed(benchmark, fn, rounds, warmup_rounds=1)


# ---- kernels, per path ---------------------------------------------------------------------------------

def test_mc(benchmark, record, compare, path, grads):
    _run(benchmark, lambda: ue.smooth_quantize(grads, tau=TAU, sigma=SIGMA, mode="mc", n0=N0, n=N), 3)
    record(f"isa/{path}/mc", benchmark, elements=_numel(grads), draws=_numel(grads) * (N0 + N))
    compare(f"isa/{path}: mc vs eager (AVX2 target >= 40x)", f"isa/{path}/mc", "isa/eager mc")


def test_analytic(benchmark, record, compare, path, grads):
    _run(benchmark, lambda: ue.smooth_quantize(grads, tau=TAU, sigma=SIGMA, mode="analytic"), 20)
    record(f"isa/{path}/analytic", benchmark, elements=_numel(grads), bytes_moved=9 * _numel(grads))
    compare(f"isa/{path}: analytic fraction of copy bandwidth (target >= 0.5)", f"isa/{path}/analytic",
            "isa/fp32 copy", "GB_per_s")
    # The kernel allocates its outputs at every call, the copy above writes into one buffer: where the
    # allocator hands back fresh pages (glibc returns large freed blocks to the OS), the page faults can
    # cost more than the arithmetic. Against a copy that allocates its outputs too, both pay them.
    compare(f"isa/{path}: analytic fraction of allocating-copy bandwidth", f"isa/{path}/analytic",
            "isa/fp32 clone", "GB_per_s")


def test_select_top1pct(benchmark, record, compare, path, scores, params):
    work = [p.clone() for p in params]
    count = _run(benchmark, lambda: kernel_select_reset(scores, work), 20)
    assert count == S.resolve_k(FRACTION, _numel(scores))
    record(f"isa/{path}/select", benchmark, elements=_numel(scores))
    compare(f"isa/{path}: select top-1% vs torch.topk (target >= 25x)", f"isa/{path}/select", "isa/torch_topk")
    compare(f"isa/{path}: select top-1% vs double argsort (target >= 200x)", f"isa/{path}/select",
            "isa/double_argsort")


def test_random_k(benchmark, record, compare, path, scores, params):
    work = [p.clone() for p in params]
    _run(benchmark, lambda: kernel_random_k_reset(scores, work), 20)
    record(f"isa/{path}/random_k", benchmark, elements=_numel(params))
    compare(f"isa/{path}: random-k 1% vs torch.topk", f"isa/{path}/random_k", "isa/torch_topk")


def test_int8_encode(benchmark, record, compare, path, grads):
    _run(benchmark, lambda: _ops.blockwise_quantize(grads, 8, BLOCK), 20)
    record(f"isa/{path}/int8 encode", benchmark, elements=_numel(grads), bytes_moved=5 * _numel(grads))
    compare(f"isa/{path}: int8 encode vs eager (target >= 5x)", f"isa/{path}/int8 encode", "isa/int8 encode eager")


def test_int8_decode(benchmark, record, compare, path, grads):
    codes, scales = _ops.blockwise_quantize(grads, 8, BLOCK)
    out = [torch.empty_like(g) for g in grads]
    _run(benchmark, lambda: _ops.blockwise_dequantize_(out, codes, scales, 8, BLOCK), 20)
    record(f"isa/{path}/int8 decode", benchmark, elements=_numel(grads), bytes_moved=5 * _numel(grads))
    compare(f"isa/{path}: int8 decode fraction of copy bandwidth", f"isa/{path}/int8 decode", "isa/fp32 copy",
            "GB_per_s")


# ---- baselines, once ------------------------------------------------------------------------------------

def test_eager_mc(benchmark, record, grads):
    table = radius_table(N, ALPHA, "cpu")
    _run(benchmark, lambda: eager_mc(grads, TAU, SIGMA, N0, N, table), 1)
    record("isa/eager mc", benchmark, elements=_numel(grads), draws=_numel(grads) * (N0 + N))


def test_fp32_copy(benchmark, record, grads):
    src = torch.cat([g.reshape(-1) for g in grads])
    dst = torch.empty_like(src)
    _run(benchmark, lambda: dst.copy_(src), 20)
    record("isa/fp32 copy", benchmark, elements=src.numel(), bytes_moved=8 * src.numel())


def test_fp32_clone(benchmark, record, grads):
    """The copy with fresh outputs at every call, one per tensor, as the kernels make theirs."""
    _run(benchmark, lambda: [g.clone() for g in grads], 20)
    record("isa/fp32 clone", benchmark, elements=_numel(grads), bytes_moved=8 * _numel(grads))


def test_torch_topk(benchmark, record, scores, params):
    work = [p.clone() for p in params]
    _run(benchmark, lambda: topk_select_reset(scores, work), 5)
    record("isa/torch_topk", benchmark, elements=_numel(scores))


@pytest.mark.skipif(os.environ.get("UNLEARN_BENCH_SKIP_ARGSORT") == "1", reason="UNLEARN_BENCH_SKIP_ARGSORT=1")
def test_double_argsort(benchmark, record, scores, params):
    work = [p.clone() for p in params]
    _run(benchmark, lambda: double_argsort_select_reset(scores, work), 1)
    record("isa/double_argsort", benchmark, elements=_numel(scores))


def test_int8_encode_eager(benchmark, record, grads):
    _run(benchmark, lambda: eager_quantize(grads, 8), 5)
    record("isa/int8 encode eager", benchmark, elements=_numel(grads), bytes_moved=5 * _numel(grads))


def test_int8_decode_eager(benchmark, record, grads):
    codes, scales = _ops.blockwise_quantize(grads, 8, BLOCK)
    shapes = [g.shape for g in grads]
    _run(benchmark, lambda: eager_dequantize(codes, scales, shapes, 8), 5)
    record("isa/int8 decode eager", benchmark, elements=_numel(grads), bytes_moved=5 * _numel(grads))
