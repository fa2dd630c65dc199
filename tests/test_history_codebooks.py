"""The codebook formats of the history codec ops (levels="normal": 4-bit normal-quantile codebook,
levels="companded": 8-bit quadratic companding) against the pure-PyTorch reference, bit for bit:
codes, scales, dequantized values, delta_encode_'s reconstruction and axpy; the dot product to a
stated tolerance. Odd sizes, three dtypes, non-contiguous inputs, empty lists, the compiled level
tables against the formula, nearest-level choice at the midpoints, error bounds (plain and
closed-loop), opcheck and bad input. The linear formats have the same battery in
test_history_ops.py. On 'cuda' the CUDA kernels are also compared with the CPU kernels."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from unlearn_ext import ops as _ops, reference
from unlearn_ext.reference import codecs as ref_codecs
from conftest import DTYPES, LAYOUTS, assert_lists_equal, devices, make_list, make_tensor, requires_compiled, to_cpu

FORMATS = [(4, "normal"), (8, "companded")]
FORMAT_IDS = ["normal4", "companded8"]
SIZES = [0, 1, 255, 100003]
BLOCKS = [64, 256, 4096]


def quantize_both(x, bits, block, levels):
    out = _ops.blockwise_quantize(x, bits, block, levels)
    ref = reference.blockwise_quantize(to_cpu(x), bits, block, levels)
    assert_lists_equal(out[0], ref[0], "codes")
    assert_lists_equal(out[1], ref[1], "scales")
    if x and x[0].device.type != "cpu":
        cpu = _ops.blockwise_quantize(to_cpu(x), bits, block, levels)
        assert_lists_equal(out[0], cpu[0], "codes (cuda vs cpu)")
        assert_lists_equal(out[1], cpu[1], "scales (cuda vs cpu)")
    return out


def delta(impl, target, recon, bits, block, levels):
    codes, scales = _ops.empty_codes(target, bits, block)
    impl.delta_encode_(target, recon, codes, scales, bits, block, levels)
    return codes, scales


def bound_per_element(scales, bits, levels, block, numel):
    """The stated bound: covering radius of the codebook times the block's absmax, plus 2^-22
    absmax for the float roundings (1 / scale, x * inv, level * scale)."""
    per_scale = scales.abs().repeat_interleave(block)[:numel]
    absmax = per_scale * (1.0 if levels == "normal" else ref_codecs.COMPAND_MAX)
    return absmax * (ref_codecs.max_codebook_error(bits, levels) + 2**-22)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES)
def test_quantize_matches_reference(device, fmt, block, dtype, size):
    bits, levels = fmt
    x = [make_tensor(size, "contiguous", dtype, device, seed=size + block)]
    codes, scales = quantize_both(x, bits, block, levels)
    n = x[0].numel()
    assert codes[0].shape == ((n if bits == 8 else (n + 1) // 2),)
    assert codes[0].dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert scales[0].shape == (math.ceil(n / block),) and scales[0].dtype == torch.float32
    out = [torch.empty_like(x[0], dtype=torch.float32)]
    _ops.blockwise_dequantize_(out, codes, scales, bits, block, levels)
    if n:
        err = (out[0] - x[0].float()).abs()
        bound = bound_per_element(scales[0], bits, levels, block, n)
        assert bool((err <= bound).all()), float((err - bound).max())


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_list_and_layouts(device, fmt, dtype):
    bits, levels = fmt
    x = make_list([0, 7, 1, 255, 33, 0, 4101, 60, 64, 65], LAYOUTS, dtype, device, seed=3)
    x.append(torch.randn(3, 4, 5, device=device).to(dtype).permute(2, 0, 1))
    codes, scales = quantize_both(x, bits, 64, levels)
    contig = _ops.blockwise_quantize([t.contiguous() for t in x], bits, 64, levels)
    assert_lists_equal(codes, contig[0])
    assert_lists_equal(scales, contig[1])


@pytest.mark.parametrize("device", devices())
def test_normal4_levels_midpoints_and_signed_scale(device):
    """The compiled table equals the formula's (a block whose absmax is +1 has scale 1, so
    y = x): every level decodes to itself, values at a midpoint go to the lower level and the
    next float up to the upper one. A block whose largest magnitude is negative gets a negative
    scale, so that value still decodes exactly (to level +1 times the scale)."""
    lv = ref_codecs.normal4_levels()
    mids = ref_codecs.normal4_midpoints()
    above = torch.nextafter(mids, torch.full_like(mids, 2.0))
    x = torch.cat([lv, mids, above, torch.zeros(64 - 16 - 30)])
    neg = -torch.linspace(0, 3, 64)                                  # absmax 3 occurs only as -3
    tie = torch.cat([torch.tensor([2.0, -2.0]), torch.zeros(62)])   # +absmax wins a tie
    special = torch.cat([torch.tensor([float("nan"), float("inf"), 0.5]), torch.zeros(61)])
    xs = [t.to(device) for t in (x, neg, tie, special, torch.zeros(64))]
    codes, scales = quantize_both(xs, 4, 64, "normal")
    assert float(scales[0][0]) == 1.0
    c = ref_codecs.unpack_codes(codes[0].cpu(), 4, 64, "normal")
    assert c[:16].tolist() == list(range(16))
    assert c[16:31].tolist() == list(range(15))          # at the midpoint: the lower level
    assert c[31:46].tolist() == list(range(1, 16))       # one ulp above: the upper level
    out = [torch.empty(64, device=device) for _ in xs]
    _ops.blockwise_dequantize_(out, codes, scales, 4, 64, "normal")
    assert torch.equal(out[0][:16].cpu(), lv)
    assert float(scales[1][0]) == -3.0 and float(out[1][63]) == -3.0
    assert float(scales[2][0]) == 2.0
    s = ref_codecs.unpack_codes(codes[3].cpu(), 4, 64, "normal")
    assert s[:2].tolist() == [7, 7] and int(s[2]) == 15     # NaN/Inf: the zero level; 0.5: +1
    assert float(scales[4][0]) == 0.0 and not out[4].any()


@pytest.mark.parametrize("device", devices())
def test_companded8_levels_and_midpoints(device):
    """Levels k (127 + 3 k): with absmax 64516 the scale is 1, so y = x and every level and
    midpoint can be placed exactly; the closed-form search must agree with the exact one."""
    k = torch.arange(0, 128, dtype=torch.float32)
    levels = k * (127 + 3 * k)
    mids = ref_codecs.compand8_midpoints()
    x = torch.cat([levels, -levels[1:], mids, -mids, torch.nextafter(mids, torch.full_like(mids, 1e9)),
                   torch.tensor([float("nan"), float("inf")])])
    codes, scales = quantize_both([x.to(device)], 8, 4096, "companded")
    assert float(scales[0][0]) == 1.0
    c = codes[0].cpu().to(torch.int64)
    assert c[:128].tolist() == list(range(128)) and c[128:255].tolist() == [-i for i in range(1, 128)]
    assert c[255:382].tolist() == list(range(127))                    # at a midpoint: the smaller
    assert c[382:509].tolist() == [-i for i in range(127)]
    assert c[509:636].tolist() == list(range(1, 128))                 # above it: the larger
    assert c[636:].tolist() == [0, 0]
    out = [torch.empty_like(x, device=device)]
    _ops.blockwise_dequantize_(out, codes, scales, 8, 4096, "companded")
    assert torch.equal(out[0][:255].cpu(), x[:255])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_matches_reference(device, fmt, block, dtype):
    bits, levels = fmt
    x = make_list([1, 255, 5000, 0], LAYOUTS, torch.float32, device, seed=block)
    codes, scales = _ops.blockwise_quantize(x, bits, block, levels)
    out = [torch.empty(t.shape, dtype=dtype, device=device) for t in x]
    out[2] = torch.empty(5000 * 2, dtype=dtype, device=device)[::2]  # non-contiguous output
    _ops.blockwise_dequantize_(out, codes, scales, bits, block, levels)
    ref = [torch.empty(o.shape, dtype=dtype) for o in out]
    reference.blockwise_dequantize_(ref, to_cpu(codes), to_cpu(scales), bits, block, levels)
    assert_lists_equal(out, ref, "dequantized")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_delta_encode_matches_reference(device, fmt, block, dtype):
    bits, levels = fmt
    target = make_list([0, 1, 255, 70001], LAYOUTS, dtype, device, seed=11)
    recon = [make_tensor(t.numel(), "contiguous", torch.float32, device, seed=5).reshape(t.shape) for t in target]
    recon[2] = torch.randn(255 * 3, device=device)[::3]  # non-contiguous, updated in place
    ref_recon = [r.cpu().clone() for r in recon]
    codes, scales = delta(_ops, target, recon, bits, block, levels)
    r_codes, r_scales = delta(reference, to_cpu(target), ref_recon, bits, block, levels)
    assert_lists_equal(codes, r_codes, "codes")
    assert_lists_equal(scales, r_scales, "scales")
    assert_lists_equal(recon, ref_recon, "recon")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_closed_loop_error_is_bounded_and_decodes_exactly(device, fmt):
    """A 200-step random walk encoded by closed-loop deltas: after every step the reconstruction
    is within the codebook's covering radius (half its largest gap, or the distance from -1 to
    the lowest level for "normal") times the delta block's absmax, and applying the same codes
    with dequantize_axpy_(alpha = 1) reproduces the encoder's reconstruction bit for bit."""
    bits, levels = fmt
    gen = torch.Generator().manual_seed(1)
    shapes = [(1000,), (333,)]
    w = [torch.randn(s, generator=gen).to(device) for s in shapes]
    recon = [t.clone() for t in w]            # an exact keyframe
    decoder = [t.clone() for t in w]
    for _ in range(200):
        w = [t - 1e-2 * torch.randn(t.shape, generator=gen).to(device) for t in w]
        delta_seen = [a - r for a, r in zip(w, recon)]
        codes, scales = delta(_ops, w, recon, bits, 256, levels)
        _ops.dequantize_axpy_(decoder, 1.0, codes, scales, bits, 256, levels)
        assert_lists_equal(decoder, recon, "decoder vs encoder")
        for a, r, d, s in zip(w, recon, delta_seen, scales):
            bound = bound_per_element(s.cpu(), bits, levels, 256, a.numel())
            absmax = d.abs().cpu().reshape(-1)
            # plus half an ulp of the value for the fp32 add recon + deq
            err = (a - r).abs().cpu() - torch.finfo(torch.float32).eps * a.abs().cpu()
            assert bool((err <= bound).all()), float((err - bound).max())
            assert bool((bound <= absmax.max() * 0.21).all())


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_axpy_matches_reference(device, fmt, dtype):
    bits, levels = fmt
    x = make_list([3, 255, 9000], LAYOUTS, torch.float32, device, seed=4)
    codes, scales = _ops.blockwise_quantize(x, bits, 64, levels)
    y = make_list([3, 255, 9000], tuple(reversed(LAYOUTS)), dtype, device, seed=8)
    ref = [t.cpu().clone() for t in y]
    _ops.dequantize_axpy_(y, -0.37, codes, scales, bits, 64, levels)
    reference.dequantize_axpy_(ref, -0.37, to_cpu(codes), to_cpu(scales), bits, 64, levels)
    assert_lists_equal(y, ref, "y")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dot_matches_reference(device, fmt, block, dtype):
    """<deq(q), v> to float32 accumulation accuracy (block sums in float32, float64 across)."""
    bits, levels = fmt
    x = make_list([1, 255, 100003, 0], LAYOUTS, torch.float32, device, seed=6)
    codes, scales = _ops.blockwise_quantize(x, bits, block, levels)
    v = make_list([1, 255, 100003, 0], LAYOUTS, dtype, device, seed=9)
    got = _ops.dequantize_dot(codes, scales, v, bits, block, levels)
    want = reference.dequantize_dot(to_cpu(codes), to_cpu(scales), to_cpu(v), bits, block, levels)
    assert got.dtype == torch.float64 and got.shape == ()
    mag = sum(float((ref_codecs.dequantize_values(c.cpu(), s.cpu(), bits, block, t.numel(), levels).double()
                     * t.cpu().reshape(-1).double()).abs().sum()) for c, s, t in zip(codes, scales, v))
    assert abs(float(got) - float(want)) <= block * 2**-24 * mag + 1e-300


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_empty_lists(device, fmt):
    bits, levels = fmt
    codes, scales = _ops.blockwise_quantize([], bits, 256, levels)
    assert codes == [] and scales == []
    _ops.delta_encode_([], [], [], [], bits, 256, levels)
    codes, scales = _ops.blockwise_quantize([torch.empty(0, device=device)], bits, 256, levels)
    assert codes[0].numel() == 0 and scales[0].numel() == 0
    _ops.blockwise_dequantize_([torch.empty(0, device=device)], codes, scales, bits, 256, levels)
    assert float(_ops.dequantize_dot(codes, scales, [torch.empty(0, device=device)], bits, 256, levels)) == 0.0


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(0, 700), min_size=1, max_size=4),
       block=st.sampled_from([64, 66, 128, 130, 256]),
       scale=st.floats(1e-30, 1e30), heavy=st.booleans(), seed=st.integers(0, 2**16))
def test_property_kernels_match_reference(fmt, sizes, block, scale, heavy, seed):
    """Random shapes, magnitudes, Gaussian or Student-t(3) values and even block sizes."""
    bits, levels = fmt
    torch.manual_seed(seed)
    draw = (lambda n: torch.distributions.StudentT(3.0).sample((n,))) if heavy else torch.randn
    x = [draw(n) * scale for n in sizes]
    quantize_both(x, bits, block, levels)
    recon = [draw(n) * scale for n in sizes]
    ref_recon = [r.clone() for r in recon]
    c1 = delta(_ops, x, recon, bits, block, levels)
    c2 = delta(reference, x, ref_recon, bits, block, levels)
    assert_lists_equal(c1[0] + c1[1] + recon, c2[0] + c2[1] + ref_recon)


def test_codebooks_beat_the_linear_codes_in_rms_error():
    """What the codebooks are for (not a speed claim): on Gaussian and Student-t(3) data, at the
    same bytes, "normal" has a lower RMS error than int4 and "companded" than int8."""
    torch.manual_seed(0)
    data = {"gauss": torch.randn(1 << 16), "t3": torch.distributions.StudentT(3.0).sample((1 << 16,))}
    for name, x in data.items():
        for bits, levels in FORMATS:
            errs = {}
            for lv in ("linear", levels):
                codes, scales = _ops.blockwise_quantize([x], bits, 64, lv)
                out = [torch.empty_like(x)]
                _ops.blockwise_dequantize_(out, codes, scales, bits, 64, lv)
                errs[lv] = float((out[0] - x).pow(2).mean().sqrt())
            assert errs[levels] < errs["linear"], (name, bits, errs)


# ---- opcheck and bad input --------------------------------------------------------------------------

@requires_compiled
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_opcheck(device, fmt):
    bits, levels = fmt
    ops = torch.ops.unlearn_ext
    x = [torch.randn(300, device=device), torch.randn(7, 9, device=device)]
    codes, scales = ops.blockwise_quantize(x, bits, 64, levels)
    torch.library.opcheck(ops.blockwise_quantize, (x, bits, 64, levels))
    torch.library.opcheck(ops.blockwise_dequantize_, ([torch.empty_like(t) for t in x], codes, scales, bits, 64,
                                                      levels))
    torch.library.opcheck(ops.delta_encode_, (x, [torch.zeros_like(t) for t in x], *_ops.empty_codes(x, bits, 64),
                                              bits, 64, levels))
    torch.library.opcheck(ops.dequantize_axpy_, ([torch.randn_like(t) for t in x], 0.5, codes, scales, bits, 64,
                                                 levels))
    torch.library.opcheck(ops.dequantize_dot, (codes, scales, x, bits, 64, levels))


@requires_compiled
def test_bad_levels_have_messages():
    ops = torch.ops.unlearn_ext
    x = [torch.randn(100)]
    with pytest.raises(RuntimeError, match="levels must be 'linear', 'normal' \\(4-bit\\) or 'companded'"):
        ops.blockwise_quantize(x, 8, 64, "nf4")
    with pytest.raises(RuntimeError, match="levels 'normal' is a 4-bit codebook, got bits 8"):
        ops.blockwise_quantize(x, 8, 64, "normal")
    with pytest.raises(RuntimeError, match="levels 'companded' is an 8-bit codebook, got bits 4"):
        ops.delta_encode_(x, [torch.zeros(100)], *_ops.empty_codes(x, 4, 64), 4, 64, "companded")
    with pytest.raises(RuntimeError, match="levels must be"):
        ops.blockwise_dequantize_([], [], [], 4, 64, "")
    codes, scales = ops.blockwise_quantize(x, 4, 64, "normal")
    with pytest.raises(RuntimeError, match="8-bit codes are"):
        ops.dequantize_dot(codes, scales, x, 8, 64, "companded")
    with pytest.raises(RuntimeError, match="same block_size"):
        ops.dequantize_axpy_([torch.zeros(100)], 1.0, codes, scales, 4, 128, "normal")


def test_reference_and_fakes_reject_bad_levels():
    with pytest.raises(ValueError, match="levels must be"):
        reference.blockwise_quantize([torch.randn(4)], 8, 64, "dyn8")
    with pytest.raises(ValueError, match="4-bit codebook"):
        reference.blockwise_quantize([torch.randn(4)], 8, 64, "normal")
    from unlearn_ext.ops import op_checks  # the check the fakes and the reference kernels make
    with pytest.raises(RuntimeError, match="8-bit codebook"):
        op_checks._check_codec_args(4, 64, "companded")
