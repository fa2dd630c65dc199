"""The CPU kernels' vector paths (csrc/cpu/isa.h): chosen at run time, forced with UNLEARN_EXT_CPU_ISA,
and identical bit for bit to the scalar path and to the pure-PyTorch reference on every path this
CPU can run. Paths the CPU lacks are skipped here (and refused when forced)."""
from __future__ import annotations

import pytest
import torch

from unlearn_ext import ops, reference, selection as S
from unlearn_ext.reference import select as RS
from unlearn_ext.pcmu.smoothing import radius_table
from conftest import DTYPES, LAYOUTS, assert_lists_equal, assert_quantize_equal, make_list, requires_compiled, signed64

pytestmark = requires_compiled

ALL_PATHS = ("scalar", "avx2", "avx512", "neon")
TAU, SIGMA = 0.2, 0.25


def _c():
    from unlearn_ext.ops.loader import _C
    return _C


def _cpu_flags() -> set:
    try:
        return set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return set()


def _expected_paths() -> list:
    """What /proc/cpuinfo says this CPU can run (independent of the extension's own detection);
    every aarch64 CPU has NEON."""
    if __import__("platform").machine() == "aarch64":
        return ["scalar", "neon"]
    flags = _cpu_flags()
    out = ["scalar"]
    if {"avx2", "fma", "bmi2", "popcnt"} <= flags:
        out.append("avx2")
        if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
            out.append("avx512")
    return out


def _vector_paths():
    have = set(_c().cpu_isas()) if _c() is not None else set()
    return [pytest.param(p, marks=pytest.mark.skipif(p not in have, reason=f"this CPU cannot run the {p} path"))
            for p in ALL_PATHS[1:]]


def _on(monkeypatch, path, run):
    monkeypatch.setenv("UNLEARN_EXT_CPU_ISA", path)
    assert _c().cpu_isa() == path
    return run()


def _both(monkeypatch, path, run):
    """run() on the vector path, then on the scalar path."""
    return _on(monkeypatch, path, run), _on(monkeypatch, "scalar", run)


# ---- the choice ---------------------------------------------------------------------------------------

def test_paths_match_the_cpu(monkeypatch):
    import unlearn_ext as ue
    monkeypatch.delenv("UNLEARN_EXT_CPU_ISA", raising=False)
    if "linux" in __import__("sys").platform and __import__("platform").machine() in ("x86_64", "aarch64"):
        assert list(_c().cpu_isas()) == _expected_paths()
    assert _c().cpu_isa() == _c().cpu_isas()[-1]
    info = ue.build_info()
    assert info["cpu_isa"] == _c().cpu_isas()[-1] and info["cpu_isas"] == list(_c().cpu_isas())
    assert "-march" not in info["cpu_flags"]  # portable: the widest path is picked at run time


def test_forced_path_is_taken_and_bad_names_are_refused(monkeypatch):
    for path in _c().cpu_isas():
        monkeypatch.setenv("UNLEARN_EXT_CPU_ISA", path)
        assert _c().cpu_isa() == path
    monkeypatch.setenv("UNLEARN_EXT_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="UNLEARN_EXT_CPU_ISA=sse9 is not a path name"):
        _c().cpu_isa()
    with pytest.raises(RuntimeError, match="UNLEARN_EXT_CPU_ISA=sse9"):  # before any work
        ops.quantize_analytic([torch.ones(3)], 0.5, 0.0)
    missing = [p for p in ALL_PATHS if p not in _c().cpu_isas()]
    if missing:
        monkeypatch.setenv("UNLEARN_EXT_CPU_ISA", missing[0])
        with pytest.raises(RuntimeError, match=f"UNLEARN_EXT_CPU_ISA={missing[0]} names a path this CPU"):
            ops.blockwise_quantize([torch.ones(3)], 8, 64)


# ---- smoothing ----------------------------------------------------------------------------------------

def _grads(dtype=torch.float32):
    g = torch.Generator().manual_seed(17)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, TAU, -TAU, 3e38, -3e38,
                            1e-40, 0.19999, 0.20001, -0.5, 0.5, 5.0, -5.0, 1.2, -1.2])
    out = [torch.randn(4099, generator=g) * 0.4, special.repeat(7), torch.randn(13, 5, generator=g).t(),
           torch.randn(1, generator=g), torch.randn(7, generator=g), torch.zeros(0)]
    return [t.to(dtype) for t in out]


def _synthetic_table(n):
    return torch.linspace(-1.0, 2.0, n + 1, dtype=torch.float32) + 1e-3


@pytest.mark.parametrize("path", _vector_paths())
@pytest.mark.parametrize("n0,n", [(16, 64), (5, 7), (3, 2), (1, 1), (9, 31)])
@pytest.mark.parametrize("seed,offset", [(0, 0), (2**63 + 2**40 + 9, 2**32 - 3), (2**64 - 1, 2**64 - 2)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_mc_identical_to_scalar_and_reference(monkeypatch, path, n0, n, seed, offset, dtype):
    grads = _grads(dtype)
    table = radius_table(n) if n >= 64 else _synthetic_table(n)
    run = lambda: ops.quantize_mc(grads, TAU, SIGMA, n0, n, table, signed64(seed), signed64(offset), 0.1)  # noqa: E731
    fast, scalar = _both(monkeypatch, path, run)
    assert_quantize_equal(fast, scalar)
    for r, rs in zip(fast[1], scalar[1]):  # radii bit for bit, not only within an ulp
        assert torch.equal(r, rs)
    assert torch.equal(fast[2], scalar[2])
    ref = reference.quantize_mc(grads, TAU, SIGMA, n0, n, table, seed, offset, 0.1)
    assert all(torch.equal(a, b) for a, b in zip(fast[0], ref[0])), "codes differ from the reference"
    assert torch.equal(fast[3], ref[3])


@pytest.mark.parametrize("path", _vector_paths())
@pytest.mark.parametrize("n0,n,offset", [
    (4, 4, 0),              # whole blocks only, one per phase
    (12, 4, 2**32 - 2),     # odd block counts per phase; the counter's high word changes in selection
    (8, 5, 7),              # a partial last block
    (2, 3, 2**32 - 1),      # a block split at n0, then a partial one
    (1, 2, 2**64 - 1),      # one block both split at n0 and partial; the counter wraps
    (16, 64, 2**32 - 10),   # the high word changes in the middle of the estimation blocks
])
def test_mc_identical_across_block_layouts(monkeypatch, path, n0, n, offset):
    """Vector paths count draws in whole blocks, in blocks split by a phase boundary and across a
    change of the Philox counter's high word; each layout against the scalar path and the reference."""
    grads = _grads()
    table = _synthetic_table(n)
    run = lambda: ops.quantize_mc(grads, TAU, SIGMA, n0, n, table, 5, signed64(offset), 0.1)  # noqa: E731
    fast, scalar = _both(monkeypatch, path, run)
    assert_quantize_equal(fast, scalar)
    for r, rs in zip(fast[1], scalar[1]):
        assert torch.equal(r, rs)
    ref = reference.quantize_mc(grads, TAU, SIGMA, n0, n, table, 5, offset, 0.1)
    assert all(torch.equal(a, b) for a, b in zip(fast[0], ref[0])), "codes differ from the reference"
    assert torch.equal(fast[3], ref[3])


@pytest.mark.parametrize("path", _vector_paths())
@pytest.mark.parametrize("tau,sigma", [(TAU, SIGMA), (0.0, 1.0), (TAU, 1e-30), (TAU, 1e30), (1e30, 1.0)])
def test_mc_identical_at_extreme_scales(monkeypatch, path, tau, sigma):
    grads = _grads()
    run = lambda: ops.quantize_mc(grads, tau, sigma, 16, 64, radius_table(64), 3, 7, 0.1)  # noqa: E731
    fast, scalar = _both(monkeypatch, path, run)
    assert_quantize_equal(fast, scalar)


@pytest.mark.parametrize("path", _vector_paths())
@pytest.mark.parametrize("kind", ["mc", "analytic"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_steps_identical(monkeypatch, path, kind, dtype):
    grads = [g for g in _grads(dtype) if g.numel()]
    grads = [torch.nan_to_num(g) for g in grads]

    def run():
        params = [torch.linspace(-1, 1, g.numel()).reshape(g.shape).to(dtype) for g in grads]
        if kind == "mc":
            stats = ops.quantized_step_mc_(params, grads, TAU, SIGMA, 16, 64, radius_table(64), 11, 2**33, 0.5,
                                           0.05, False)
        else:
            stats = ops.quantized_step_analytic_(params, grads, 0.3, 0.5, 0.05, True)
        return params, stats
    (p_fast, s_fast), (p_scalar, s_scalar) = _both(monkeypatch, path, run)
    assert_lists_equal(p_fast, p_scalar, "params")
    assert torch.equal(s_fast[0], s_scalar[0]) and torch.equal(s_fast[1], s_scalar[1])
    start = [torch.linspace(-1, 1, g.numel()).reshape(g.shape).to(dtype) for g in grads]
    assert any(not torch.equal(p, q) for p, q in zip(p_fast, start))  # something moved: the comparison says something


@pytest.mark.parametrize("path", _vector_paths())
@pytest.mark.parametrize("dtype", DTYPES)
def test_analytic_identical_to_scalar_and_reference(monkeypatch, path, dtype):
    grads = _grads(dtype)
    fast, scalar = _both(monkeypatch, path, lambda: ops.quantize_analytic(grads, 0.3, 0.05))
    assert_quantize_equal(fast, scalar)
    assert_quantize_equal(fast, reference.quantize_analytic(grads, 0.3, 0.05), shapes=[g.shape for g in grads])


# ---- selection ----------------------------------------------------------------------------------------

SIZES = [37, 1, 255, 6, 0, 4097, 70001]


@pytest.mark.parametrize("path", _vector_paths())
@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_histograms_identical_to_reference(monkeypatch, path, mode, dtype):
    scores = make_list(SIZES, LAYOUTS, dtype, "cpu", seed=3)
    ref_scores = [s.clone() for s in scores]
    for prefix, prefix_bits, digit_bits in [(0, 0, 16), (0x8, 4, 12), (5, 3, 1)]:
        args = (mode, 7, 2**32 + 5, 11, prefix, prefix_bits, digit_bits)
        got = _on(monkeypatch, path, lambda: ops.select_histogram(scores, *args))
        assert torch.equal(got, RS.select_histogram(ref_scores, *args))
    for k in (0, 1, 50, 1000):
        near = _on(monkeypatch, path, lambda: ops.select_histogram_near(scores, mode, 7, 3, 11, k))
        assert torch.equal(near, _on(monkeypatch, "scalar", lambda: ops.select_histogram_near(scores, mode, 7, 3,
                                                                                              11, k)))


@pytest.mark.parametrize("path", _vector_paths())
@pytest.mark.parametrize("by", ["abs", "value", "random"])
@pytest.mark.parametrize("action,alpha,with_source", [("reset", 0.0, False), ("dampen", 0.1, False),
                                                      ("noise", 0.05, False), ("axpy", -0.3, True)])
def test_select_and_apply_identical(monkeypatch, path, by, action, alpha, with_source):
    """The whole selection (histogram or fused route), its masks and the perturbation: identical on
    the vector path and the scalar path, and the selected set equal to the reference's top-K."""
    scores = make_list(SIZES, LAYOUTS, torch.float32, "cpu", seed=10)
    source = make_list(SIZES, LAYOUTS, torch.float32, "cpu", seed=12) if with_source else None
    n = sum(s.numel() for s in scores)

    def run():
        params = make_list(SIZES, LAYOUTS, torch.float32, "cpu", seed=9)
        out = []
        for k in (0, 1, 17, n // 100, n // 3):
            if by == "random":
                sel = S.random_k(params, k, seed=(-(1 << 40) - 3) & (2**64 - 1), offset=5)
            else:
                sel = S.topk(scores, k, by=by)
            count, masks = sel.apply_(params, action, alpha, source, masks=True, noise_seed=21, noise_offset=3)
            out.append((count, [m.clone() for m in masks]))
        return params, out
    (p_fast, sel_fast), (p_scalar, sel_scalar) = _both(monkeypatch, path, run)
    assert_lists_equal(p_fast, p_scalar, "params")
    for (c_fast, m_fast), (c_scalar, m_scalar), k in zip(sel_fast, sel_scalar, (0, 1, 17, n // 100, n // 3)):
        assert c_fast == c_scalar == k
        assert_lists_equal(m_fast, m_scalar, "masks")
    if by == "random":
        keys, _ = RS.keys_of(make_list(SIZES, LAYOUTS, torch.float32, "cpu", seed=9), 2, (-(1 << 40) - 3) & (2**64 - 1), 5, 0)
    else:
        keys, _ = RS.keys_of(scores, S.KEY_MODES[by], 0, 0, 0)
    order = torch.sort(keys, descending=True, stable=True).indices
    want = torch.zeros(n, dtype=torch.bool)
    want[order[: n // 3]] = True
    assert torch.equal(torch.cat([m.reshape(-1) for m in sel_fast[-1][1]]), want)


@pytest.mark.parametrize("path", _vector_paths())
def test_tie_boundary_and_mask_grad_identical(monkeypatch, path):
    base = make_list([37, 1, 70000, 6], LAYOUTS, torch.float32, "cpu", seed=5)
    scores = [((t * 4).round().clamp(-1, 1) / 4) for t in base]
    key = int(RS.order_key(torch.tensor([0.25]))[0])
    for needed in (0, 1, 5, 40, 10**6):
        got = _on(monkeypatch, path, lambda: ops.select_tie_boundary(scores, 1, 0, 0, 3, key, needed))
        assert int(got) == int(RS.select_tie_boundary(scores, 1, 0, 0, 3, key, needed))
    sel = S.topk(scores, 300)

    def run():
        grads = make_list([37, 1, 70000, 6], LAYOUTS, torch.float32, "cpu", seed=13)
        sel.mask_grad_(grads)
        return grads
    fast, scalar = _both(monkeypatch, path, run)
    assert_lists_equal(fast, scalar, "grads")


# ---- codecs -------------------------------------------------------------------------------------------

CODECS = [(8, "linear"), (4, "linear"), (4, "normal"), (8, "companded")]


@pytest.mark.parametrize("path", _vector_paths())
@pytest.mark.parametrize("bits,levels", CODECS)
@pytest.mark.parametrize("block", [64, 4096])
@pytest.mark.parametrize("dtype", DTYPES)
def test_codecs_identical_to_scalar(monkeypatch, path, bits, levels, block, dtype):
    x = make_list([37, 1, 255, 6, 0, 70001], LAYOUTS, dtype, "cpu", seed=31)
    target = make_list([37, 1, 255, 6, 0, 70001], LAYOUTS, torch.float32, "cpu", seed=32)  # the codecs' fp32 side

    def run():
        codes, scales = ops.blockwise_quantize(x, bits, block, levels)
        out = [torch.empty(t.shape, dtype=dtype) for t in x]
        ops.blockwise_dequantize_(out, codes, scales, bits, block, levels)
        recon = [t.to(torch.float32, copy=True) for t in x]
        dcodes, dscales = ops.empty_codes(target, bits, block)
        ops.delta_encode_(target, recon, dcodes, dscales, bits, block, levels)
        y = [t.clone() for t in target]
        ops.dequantize_axpy_(y, -0.75, codes, scales, bits, block, levels)
        dot = ops.dequantize_dot(codes, scales, target, bits, block, levels)
        return codes + scales + out + recon + dcodes + dscales + y + [dot]
    fast, scalar = _both(monkeypatch, path, run)
    assert_lists_equal(fast, scalar, "codec outputs")
