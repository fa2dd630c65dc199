"""The smoothing + quantization kernels (quantize_analytic, quantize_mc, quantized_step_analytic_,
quantized_step_mc_) against the pure-PyTorch reference (docs/design.md §2-4): odd sizes, three
dtypes, non-contiguous inputs and parameters, mixed-size lists. On 'cuda' the CUDA kernel is also
compared with the CPU kernel."""
import math

import pytest
import torch

from unlearn_ext import ops as _ops, reference
from unlearn_ext.pcmu.smoothing import analytic_threshold, radius_table
from conftest import (DTYPES, make_params, LAYOUTS, assert_lists_equal, assert_quantize_equal, devices, make_list,
                      make_tensor, mc_compare, requires_compiled, signed64, to_cpu)

BIG = (1 << 20) + 3
SIZES = [0, 1, 255, BIG]
TAU, SIGMA = 0.2, 0.25
BETA = analytic_threshold(TAU, SIGMA)


def synthetic_table(n: int) -> torch.Tensor:
    """A radius table whose entries change sign inside [0, n]: counts below ~n/3 abstain, the rest
    certify with a count-dependent radius. Unlike the Clopper-Pearson table at small n (which
    abstains everywhere), it makes codes and radii depend on every count."""
    return torch.linspace(-1.0, 2.0, n + 1, dtype=torch.float32) + 1e-3


# ---- analytic -------------------------------------------------------------------------------------

def check_analytic(device, grads, beta, count_below):
    out = _ops.quantize_analytic(grads, beta, count_below)
    assert all(c.device == g.device for c, g in zip(out[0], grads))
    ref = reference.quantize_analytic(to_cpu(grads), beta, count_below)
    assert_quantize_equal(out, ref, shapes=[g.shape for g in grads])
    if device != "cpu":
        assert_quantize_equal(out, _ops.quantize_analytic(to_cpu(grads), beta, count_below))
    return out


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_analytic_matches_reference(device, dtype, size, layout):
    g = make_tensor(size, layout, dtype, device, seed=size)
    out = check_analytic(device, [g], BETA, 0.05)
    if size:
        assert {-1, 0, 1} >= set(out[0][0].unique().tolist())


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_analytic_mixed_list(device, dtype):
    sizes = [0, 7, 1, 255, 33, 0, 4101, 60]
    grads = make_list(sizes, LAYOUTS, dtype, device, seed=1)
    grads.append(torch.randn(3, 4, 5, device=device).to(dtype).permute(2, 0, 1))  # 3-D, permuted
    check_analytic(device, grads, BETA, 0.1)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta", [0.0, BETA, 1.5])
def test_analytic_special_values(device, dtype, beta):
    """NaN/Inf give code 0, radius 0 and are counted; values at and next to +-beta, signed zeros,
    the largest and smallest magnitudes follow the threshold rule."""
    bf = float(torch.tensor(beta, dtype=torch.float32))
    vals = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, bf, -bf,
            math.nextafter(bf, 10), math.nextafter(bf, -10), -math.nextafter(bf, 10),
            float(torch.finfo(dtype).max), -float(torch.finfo(dtype).max),
            float(torch.finfo(dtype).tiny), 2.0**-149, TAU, -TAU, 1.0, -1.0]
    g = torch.tensor(vals, dtype=torch.float32).to(dtype).to(device)
    for count_below in (0.0, 0.05, float("inf")):
        out = check_analytic(device, [g], beta, count_below)
        assert int(out[3][1]) == 3  # three non-finite entries
        assert float(out[2]) == 0.0  # they have radius 0
    codes, radii = out[0][0].cpu(), out[1][0].cpu()
    x = g.cpu().float()
    finite = torch.isfinite(x)
    assert torch.equal(codes[~finite], torch.zeros(3, dtype=torch.int8))
    assert torch.equal(codes[finite], torch.where(x > bf, 1, torch.where(x < -bf, -1, 0)).to(torch.int8)[finite])


# ---- Monte-Carlo ----------------------------------------------------------------------------------

MC_DRAWS = [(16, 64), (5, 7), (3, 2), (1, 1)]  # n0 + n: 80, 12, 5, 2 (multiples of 4 and not)


def mc_table(n, kind):
    return radius_table(n) if kind == "clopper-pearson" else synthetic_table(n)


def check_mc(device, grads, tau, sigma, n0, n, table, seed, offset, count_below, key):
    """seed/offset as unsigned 64-bit values; the op gets the schema's int64 view."""
    s, o = signed64(seed), signed64(offset)
    out = _ops.quantize_mc(grads, tau, sigma, n0, n, table.to(device), s, o, count_below)
    assert all(c.device == g.device and c.shape == g.shape for c, g in zip(out[0], grads))
    ref = reference.quantize_mc(to_cpu(grads), tau, sigma, n0, n, table, seed, offset, count_below)
    mc_compare(out, ref, draws=n0 + n, key=f"{key} [{device}]")
    if device != "cpu":
        cpu = _ops.quantize_mc(to_cpu(grads), tau, sigma, n0, n, table, s, o, count_below)
        mc_compare(out, cpu, draws=n0 + n, key=f"{key} [cuda vs cpu kernel]")
    return out


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [0, 1, 255])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n0,n", MC_DRAWS)
def test_mc_matches_reference(device, dtype, size, layout, n0, n):
    g = make_tensor(size, layout, dtype, device, seed=3 + size)
    kind = "clopper-pearson" if n >= 64 else "synthetic"
    # an offset whose block counter crosses 2^32 within the call, and a seed >= 2^63
    check_mc(device, [g], TAU, SIGMA, n0, n, mc_table(n, kind), 2**63 + 2**40 + 9, 2**32 - 3, 0.1,
             key=f"quantize_mc n0={n0} n={n}")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_mc_big_tensor(device, dtype, layout):
    """2^20 + 3 elements (many parallel chunks, a ragged tail) with few draws to keep it quick."""
    g = make_tensor(BIG, layout, dtype, device, seed=11)
    check_mc(device, [g], TAU, SIGMA, 1, 3, synthetic_table(3), 12345, 2**32 - 1, 0.2,
             key="quantize_mc big n0=1 n=3")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n0,n", [(16, 64), (2, 9)])
def test_mc_mixed_list(device, dtype, n0, n):
    sizes = [0, 7, 1, 255, 33, 0, 40_000, 60]
    grads = make_list(sizes, LAYOUTS, dtype, device, seed=5)
    kind = "clopper-pearson" if n >= 64 else "synthetic"
    check_mc(device, grads, 0.1, 0.3, n0, n, mc_table(n, kind), 7, 2**40, 0.05,
             key=f"quantize_mc list n0={n0} n={n}")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("seed,offset", [(0, 0), (1, 2**64 - 2), (2**64 - 1, 3)])
def test_mc_extreme_values_and_scales(device, seed, offset):
    vals = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, TAU, -TAU, 3e38, -3e38,
                         1e-40, 0.19999, 0.20001, -0.5, 0.5] * 20)
    for tau, sigma in ((TAU, SIGMA), (0.0, 1.0), (TAU, 1e-30), (TAU, 1e30), (1e30, 1.0)):
        out = check_mc(device, [vals.to(device)], tau, sigma, 16, 64, radius_table(64), seed, offset, 0.1,
                       key="quantize_mc extreme values")
        codes, radii = out[0][0].cpu(), out[1][0].cpu()
        finite = torch.isfinite(vals)
        assert int(out[3][1]) == int((~finite).sum())
        assert not codes[~finite].any() and not radii[~finite].any()
        # every abstention is a finite coordinate with code 0 and radius 0
        assert int(out[3][0]) == int(((radii == 0) & finite).sum())
        assert not codes[radii == 0].any()


@pytest.mark.parametrize("device", devices())
def test_mc_global_index_depends_on_shapes_only(device):
    """The RNG subsequence is the global element index in the list: a tensor's codes depend on the
    sizes of the tensors before it, not on their values, strides or shapes."""
    table = synthetic_table(12)
    b = make_tensor(300, "contiguous", device=device, seed=2)
    run = lambda grads: _ops.quantize_mc(grads, TAU, SIGMA, 4, 12, table.to(device), 99, 5, 0.0)  # noqa: E731
    with_a = run([make_tensor(120, "contiguous", device=device, seed=3), b])
    with_c = run([make_tensor(120, "transposed", device=device, seed=4), b])
    with_d = run([torch.zeros(4, 30, device=device), b])
    alone = run([b])
    for other in (with_c, with_d):
        assert torch.equal(with_a[0][1], other[0][1]) and torch.equal(with_a[1][1], other[1][1])
    assert not (torch.equal(with_a[0][1], alone[0][0]) and torch.equal(with_a[1][1], alone[1][0]))
    strided = make_tensor(300, "strided", device=device, seed=8)
    assert_quantize_equal(run([strided]), run([strided.contiguous()]))


@pytest.mark.parametrize("device", devices())
def test_mc_seed_and_offset_change_draws(device):
    g = [make_tensor(2000, device=device, seed=1, scale=0.2)]
    table = synthetic_table(8)
    base = _ops.quantize_mc(g, TAU, SIGMA, 4, 8, table.to(device), 5, 0, 0.0)
    again = _ops.quantize_mc(g, TAU, SIGMA, 4, 8, table.to(device), 5, 0, 0.0)
    assert_quantize_equal(base, again)  # deterministic
    for s, o in ((6, 0), (5, 3)):
        other = _ops.quantize_mc(g, TAU, SIGMA, 4, 8, table.to(device), s, o, 0.0)
        assert not torch.equal(base[1][0], other[1][0])


# ---- fused steps ----------------------------------------------------------------------------------

STEP_SIZES = [0.1, 1.0 / 3.0, 2.0**-10]


def check_step(device, name, make_args, grads, made):
    """Runs the op in place and the reference on CPU clones; parameters must agree bit for bit, the
    views' holders must have changed nowhere else, and the statistics must agree."""
    params, holders, covered = made
    ref_params = [p.detach().cpu().clone() for p in params]
    cpu_params = [p.detach().cpu().clone() for p in params]
    holders_before = [h.clone() for h in holders]
    out = getattr(_ops, name)(*make_args(params, grads))
    ref = getattr(reference, name)(*make_args(ref_params, to_cpu(grads)))
    assert_lists_equal(params, ref_params, "params")
    for h, hb, mask in zip(holders, holders_before, covered):
        assert torch.equal(h[~mask], hb[~mask])
    assert out[0].dtype == torch.float32 and out[0].shape == ()
    assert out[1].dtype == torch.int64 and out[1].shape == (3,)
    torch.testing.assert_close(out[0].cpu(), ref[0].cpu(), rtol=2.0**-23, atol=0.0)
    assert torch.equal(out[1].cpu(), ref[1].cpu())
    if device != "cpu":
        cpu = getattr(_ops, name)(*make_args(cpu_params, to_cpu(grads)))
        assert_lists_equal(params, cpu_params, "params (cuda vs cpu kernel)")
        assert torch.equal(out[1].cpu(), cpu[1].cpu())
    return out, ref


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("step_size", STEP_SIZES)
def test_step_analytic_matches_reference(device, dtype, step_size):
    sizes = [255, 0, 33, 1, 4096 + 7, 60]
    grads = make_list(sizes, LAYOUTS, dtype, device, seed=21)
    made = make_params(grads, seed=22)
    check_step(device, "quantized_step_analytic_", lambda p, g: (p, g, BETA, step_size, 0.05, True), grads, made)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_step_analytic_big(device, dtype):
    grads = [make_tensor(BIG, "strided", dtype, device, seed=1)]
    made = make_params(grads, seed=2)
    check_step(device, "quantized_step_analytic_", lambda p, g: (p, g, BETA, 0.01, 0.0, True), grads, made)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n0,n", [(16, 64), (3, 2)])
def test_step_mc_matches_reference(device, dtype, n0, n):
    sizes = [255, 0, 33, 1, 4096 + 7, 60]
    grads = make_list(sizes, LAYOUTS, dtype, device, seed=31)
    made = make_params(grads, seed=32)
    table = radius_table(n) if n >= 64 else synthetic_table(n)
    # Parameters are compared bit for bit: a threshold rounding difference (docs/design.md §3) would
    # fail this test; for these 4.5k elements its probability is below 1e-4 even if every Phi
    # differed by one level (mc_mismatch_bound), and 0 in practice on CPU.
    check_step(device, "quantized_step_mc_",
               lambda p, g: (p, g, TAU, SIGMA, n0, n, table.to(g[0].device), signed64(2**63 + 1),
                             signed64(2**32 - 2), 0.125, 0.05, True), grads, made)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("mode", ["analytic", "mc"])
@pytest.mark.parametrize("check_finite", [True, False])
def test_step_nonfinite_matches_reference(device, mode, check_finite):
    """check_finite=True: a NaN/Inf anywhere leaves every parameter untouched and reports the count
    (min_radius inf, nothing else counted). check_finite=False: those coordinates get code 0, the
    others are updated as usual."""
    sizes = [50, 3, 7]
    grads = make_list(sizes, ["contiguous"], torch.float32, device, seed=41)
    grads[1][1] = float("nan")
    grads[2][0] = float("inf")
    grads[2][5] = -float("inf")
    made = make_params(grads, seed=42)
    params = made[0]
    before = [p.clone() for p in params]
    table = synthetic_table(6)
    if mode == "analytic":
        args = lambda p, g: (p, g, BETA, 0.5, 0.1, check_finite)  # noqa: E731
        name = "quantized_step_analytic_"
    else:
        args = lambda p, g: (p, g, TAU, SIGMA, 2, 6, table.to(p[0].device), 3, 4, 0.5, 0.1, check_finite)  # noqa: E731
        name = "quantized_step_mc_"
    out, _ = check_step(device, name, args, grads, made)
    assert int(out[1][1]) == 3
    if check_finite:
        assert_lists_equal(params, before, "params")
        assert math.isinf(float(out[0])) and int(out[1][0]) == 0 and int(out[1][2]) == 0
    else:
        assert float(out[0]) == 0.0
        assert float(params[1][1]) == float(before[1][1])
        assert not all(torch.equal(a, b) for a, b in zip(params, before))


# ---- apply_codes_ ----------------------------------------------------------------------------------

def make_codes(shapes, device, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(-1, 2, tuple(s), generator=gen, dtype=torch.int8).to(device) for s in shapes]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("step_size", [0.1, 1e-3, 3.0])
def test_apply_codes_matches_reference(device, dtype, step_size):
    """Odd sizes, an empty tensor, and non-contiguous params (permuted, stride-3 views): bit for
    bit against the reference, and nothing outside the views changes."""
    sizes = [255, 0, 33, 1, 4096 + 7, 60, (1 << 15) + 5]
    grads = make_list(sizes, LAYOUTS, dtype, device, seed=51)
    params, holders, covered = make_params(grads, seed=52)
    holders_before = [h.clone() for h in holders]
    codes = make_codes([g.shape for g in grads], device, seed=53)
    ref = [p.detach().cpu().clone() for p in params]
    reference.apply_codes_(ref, to_cpu(codes), step_size)
    _ops.apply_codes_(params, codes, step_size)
    assert_lists_equal(params, ref, "params")
    for h, hb, mask in zip(holders, holders_before, covered):
        assert torch.equal(h[~mask], hb[~mask])
    if device != "cpu":
        cpu = [p.detach().cpu().clone() for p in make_params(to_cpu(grads), seed=52)[0]]
        _ops.apply_codes_(cpu, to_cpu(codes), step_size)
        assert_lists_equal(params, cpu, "params (cuda vs cpu kernel)")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_codes_equals_step_with_float_codes(device, dtype):
    """The op replaces the old replay path, the analytic step fed codes as floats at beta = 0.5: the
    same bits for every dtype."""
    grads = make_list([1000, 7, 4096 * 3 + 1], ["contiguous"], dtype, device, seed=61)
    codes = make_codes([g.shape for g in grads], device, seed=62)
    a = make_params(grads, seed=63)[0]
    b = [p.clone() for p in a]
    _ops.apply_codes_(a, codes, 0.0625)
    _ops.quantized_step_analytic_(b, [c.to(dtype) for c in codes], 0.5, 0.0625, 0.0, False)
    assert_lists_equal(a, b, "params")


@pytest.mark.parametrize("device", devices())
def test_apply_codes_empty_list(device):
    _ops.apply_codes_([], [], 0.5)
    reference.apply_codes_([], [], 0.5)


@requires_compiled
@pytest.mark.parametrize("device", devices())
def test_apply_codes_opcheck(device):
    from torch.library import opcheck
    params = make_list([33, 1025], ("contiguous", "strided"), torch.float32, device, seed=71)
    codes = make_codes([p.shape for p in params], device, seed=72)
    opcheck(torch.ops.unlearn_ext.apply_codes_, (params, codes, 0.25))


@requires_compiled
def test_apply_codes_bad_input():
    p = [torch.zeros(4)]
    with pytest.raises(RuntimeError, match="int8"):
        _ops.apply_codes_(p, [torch.zeros(4)], 0.1)
    with pytest.raises(RuntimeError, match="shape"):
        _ops.apply_codes_(p, [torch.zeros(5, dtype=torch.int8)], 0.1)
    with pytest.raises(RuntimeError, match="codes has"):
        _ops.apply_codes_(p, [], 0.1)
    with pytest.raises(RuntimeError, match="finite"):
        _ops.apply_codes_(p, [torch.zeros(4, dtype=torch.int8)], float("nan"))
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        _ops.apply_codes_([torch.zeros(4, dtype=torch.int32)], [torch.zeros(4, dtype=torch.int8)], 0.1)


# ---- the CPU `mc` kernel's paths (csrc/cpu/mc_kernel.h) ------------------------------------------
# The widest path the CPU has is chosen at run time; tests/test_cpu_isa.py forces each one and compares
# it with the scalar path bit for bit. Here: the scalar path alone against the reference (on a CPU
# with AVX2 or AVX-512 every other mc test runs the wider path).

# Values on both sides of +-tau at several scales, where thresholds hit 0 and 2^24 (every draw
# -1 or +1), non-finite values, and a ragged tail (sizes not multiples of 16).
def _path_inputs():
    g = torch.Generator().manual_seed(17)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, TAU, -TAU, 3e38, -3e38,
                            1e-40, 0.19999, 0.20001, -0.5, 0.5, 5.0, -5.0, 1.2, -1.2])
    return [torch.randn(4099, generator=g) * 0.4, special.repeat(7), torch.randn(13, 5, generator=g).t(),
            torch.randn(1, generator=g)]


@requires_compiled
@pytest.mark.parametrize("n0,n", [(16, 64), (5, 7)])
def test_mc_scalar_path_matches_reference(monkeypatch, n0, n):
    """The portable path alone against the reference."""
    monkeypatch.setenv("UNLEARN_EXT_CPU_ISA", "scalar")
    grads = _path_inputs()
    kind = "clopper-pearson" if n >= 64 else "synthetic"
    check_mc("cpu", grads, TAU, SIGMA, n0, n, mc_table(n, kind), 2**63 + 5, 2**32 - 1, 0.1,
             key=f"quantize_mc scalar path n0={n0} n={n}")
