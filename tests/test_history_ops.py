"""The history codec kernels (blockwise_quantize, blockwise_dequantize_, delta_encode_,
dequantize_axpy_, dequantize_dot) against the pure-PyTorch reference (docs/design.md §2 and §5):
codes, scales and every in-place result bit for bit; the dot product to a stated tolerance. Odd
sizes, three block sizes, three dtypes, non-contiguous inputs, empty lists, opcheck, bad input.
On 'cuda' the CUDA kernels are also compared with the CPU kernels."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from unlearn_ext import ops as _ops, reference
from unlearn_ext.reference import codecs as ref_history
from conftest import (BACKENDS, DTYPES, LAYOUTS, assert_lists_equal, devices, make_list, make_tensor, requires_compiled,
                      served_by, to_cpu)

SIZES = [0, 1, 255, 1000003]
BLOCKS = [64, 256, 4096]
BITS = [8, 4]


def delta(impl, target, recon, bits, block):
    """delta_encode_ with fresh outputs; returns (codes, scales)."""
    codes, scales = _ops.empty_codes(target, bits, block)
    impl.delta_encode_(target, recon, codes, scales, bits, block)
    return codes, scales


def quantize_both(x, bits, block):
    out = _ops.blockwise_quantize(x, bits, block)
    ref = reference.blockwise_quantize(to_cpu(x), bits, block)
    assert_lists_equal(out[0], ref[0], "codes")
    assert_lists_equal(out[1], ref[1], "scales")
    if x and x[0].device.type != "cpu":
        cpu = _ops.blockwise_quantize(to_cpu(x), bits, block)
        assert_lists_equal(out[0], cpu[0], "codes (cuda vs cpu)")
        assert_lists_equal(out[1], cpu[1], "scales (cuda vs cpu)")
    return out


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES)
def test_quantize_matches_reference(device, bits, block, dtype, size):
    x = [make_tensor(size, "contiguous", dtype, device, seed=size + block)]
    codes, scales = quantize_both(x, bits, block)
    n = x[0].numel()
    assert codes[0].shape == ((n if bits == 8 else (n + 1) // 2),)
    assert codes[0].dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert scales[0].shape == (math.ceil(n / block),) and scales[0].dtype == torch.float32
    # The stated error bound: |x - deq| <= scale / 2 + 2^-22 absmax (the float roundings of 1 / scale,
    # x * inv and code * scale, each at most 2^-24 relative, on values <= absmax).
    out = [torch.empty_like(x[0], dtype=torch.float32)]
    _ops.blockwise_dequantize_(out, codes, scales, bits, block)
    if n:
        per = scales[0].repeat_interleave(block)[:n]
        err = (out[0] - x[0].float()).abs()
        qmax = 127.0 if bits == 8 else 7.0
        assert bool((err <= per / 2 + per * qmax * 2**-22).all()), float((err - per / 2).max())


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_list_and_layouts(device, bits, dtype):
    """Non-contiguous inputs (transposed, strided) and a list of mixed sizes, empty ones included."""
    x = make_list([0, 7, 1, 255, 33, 0, 4101, 60, 64, 65], LAYOUTS, dtype, device, seed=3)
    x.append(torch.randn(3, 4, 5, device=device).to(dtype).permute(2, 0, 1))
    codes, scales = quantize_both(x, bits, 64)
    # Same codes as for contiguous copies (the layout never changes the element order).
    contig = _ops.blockwise_quantize([t.contiguous() for t in x], bits, 64)
    assert_lists_equal(codes, contig[0])
    assert_lists_equal(scales, contig[1])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("bits", BITS)
def test_special_values(device, bits):
    """A zero block gives scale 0 and codes 0; NaN/Inf count as 0 in the absmax and get code 0;
    halfway values round to even; subnormal and huge magnitudes stay in range."""
    q = 127.0 if bits == 8 else 7.0
    zero = torch.zeros(64)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0, -0.5, 0.25] + [0.0] * 58)
    # absmax q -> scale exactly 1, so y = x: the ties k + 1/2 must round to even.
    ties = [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 5.5, 6.5]
    halves = torch.tensor([q, -q] + ties + [0.0] * 54)
    tiny = torch.full((64,), 2.0**-149) * torch.linspace(-3, 3, 64).round()
    huge = torch.full((64,), torch.finfo(torch.float32).max) * torch.linspace(-1, 1, 64)
    x = [t.to(device) for t in (zero, special, halves, tiny, huge)]
    codes, scales = quantize_both(x, bits, 64)
    assert float(scales[0][0]) == 0.0 and not codes[0].cpu().any()
    assert math.isfinite(float(scales[1][0]))
    c = ref_history.unpack_codes(codes[1].cpu(), bits, 64)
    assert c[:3].tolist() == [0, 0, 0] and int(c[3]) == q
    c = ref_history.unpack_codes(codes[2].cpu(), bits, 64)
    assert float(scales[2][0]) == 1.0
    assert c[2:10].tolist() == [0, 2, 2, 0, -2, -2, 6, 6]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_matches_reference(device, bits, block, dtype):
    x = make_list([1, 255, 5000, 0], LAYOUTS, torch.float32, device, seed=block)
    codes, scales = _ops.blockwise_quantize(x, bits, block)
    out = [torch.empty(t.shape, dtype=dtype, device=device) for t in x]
    out[1] = torch.empty(2, 255, dtype=dtype, device=device)[1]  # another shape, same numel
    out[2] = torch.empty(5000 * 2, dtype=dtype, device=device)[::2]  # non-contiguous output
    _ops.blockwise_dequantize_(out, codes, scales, bits, block)
    ref = [torch.empty(o.shape, dtype=dtype) for o in out]
    reference.blockwise_dequantize_(ref, to_cpu(codes), to_cpu(scales), bits, block)
    assert_lists_equal(out, ref, "dequantized")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_delta_encode_matches_reference(device, bits, block, dtype):
    target = make_list([0, 1, 255, 70001], LAYOUTS, dtype, device, seed=11)
    recon = [make_tensor(t.numel(), "contiguous", torch.float32, device, seed=5).reshape(t.shape) for t in target]
    recon[2] = torch.randn(255 * 3, device=device)[::3]  # non-contiguous, updated in place
    ref_recon = [r.cpu().clone() for r in recon]
    codes, scales = delta(_ops, target, recon, bits, block)
    r_codes, r_scales = delta(reference, to_cpu(target), ref_recon, bits, block)
    assert_lists_equal(codes, r_codes, "codes")
    assert_lists_equal(scales, r_scales, "scales")
    assert_lists_equal(recon, ref_recon, "recon")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("bits", BITS)
def test_delta_encode_moves_recon_by_the_decoded_delta(device, bits):
    """recon_after = recon_before + deq(codes) exactly, which axpy with alpha = 1 reproduces: the
    decoder ends at the encoder's bits."""
    target = make_list([1000, 333], ("contiguous",), torch.float32, device, seed=2)
    recon = [torch.zeros_like(t) for t in target]
    before = [r.clone() for r in recon]
    codes, scales = delta(_ops, target, recon, bits, 256)
    _ops.dequantize_axpy_(before, 1.0, codes, scales, bits, 256)
    assert_lists_equal(before, recon)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_axpy_matches_reference(device, bits, block, dtype):
    x = make_list([3, 255, 9000], LAYOUTS, torch.float32, device, seed=4)
    codes, scales = _ops.blockwise_quantize(x, bits, block)
    y = make_list([3, 255, 9000], tuple(reversed(LAYOUTS)), dtype, device, seed=8)
    ref = [t.cpu().clone() for t in y]
    _ops.dequantize_axpy_(y, -0.37, codes, scales, bits, block)
    reference.dequantize_axpy_(ref, -0.37, to_cpu(codes), to_cpu(scales), bits, block)
    assert_lists_equal(y, ref, "y")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dot_matches_reference(device, bits, block, dtype):
    """<deq(q), v> to float64 accumulation accuracy: each block sums <= block products in float64
    and the blocks' terms are summed in float64, so kernel and reference, which add in different
    orders, differ by less than 2 (block + blocks) * 2^-53 * sum |deq * v|."""
    x = make_list([1, 255, 100003, 0], LAYOUTS, torch.float32, device, seed=6)
    codes, scales = _ops.blockwise_quantize(x, bits, block)
    v = make_list([1, 255, 100003, 0], LAYOUTS, dtype, device, seed=9)
    got = _ops.dequantize_dot(codes, scales, v, bits, block)
    want = reference.dequantize_dot(to_cpu(codes), to_cpu(scales), to_cpu(v), bits, block)
    assert got.dtype == torch.float64 and got.shape == ()
    mag = sum(float((ref_history.dequantize_values(c.cpu(), s.cpu(), bits, block, t.numel()).double()
                     * t.cpu().reshape(-1).double()).abs().sum()) for c, s, t in zip(codes, scales, v))
    blocks = sum(ref_history.block_count(t.numel(), block) for t in v)
    assert abs(float(got) - float(want)) <= 2 * (block + blocks) * 2**-53 * mag + 1e-300


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("backend", BACKENDS)
def test_dot_sums_each_block_in_float64(device, backend):
    """One block of codes 127 against v = 2^25, 1, -2^25 on positions 0, 16, 32: the block's sum of
    code * v is 127, which a float32 sum loses (2^25 * 127 + 127 rounds back to 2^25 * 127); in
    float64 every step is exact, so the result is exactly 127 * scale."""
    codes, scales = _ops.blockwise_quantize([torch.ones(64, device=device)], 8, 64)
    assert torch.all(codes[0] == 127)
    v = torch.zeros(64, device=device)
    v[0], v[16], v[32] = 2.0**25, 1.0, -(2.0**25)
    with served_by(backend):
        got = _ops.dequantize_dot(codes, scales, [v], 8, 64)
    assert got.dtype == torch.float64
    assert got.item() == 127.0 * float(scales[0][0])


@pytest.mark.parametrize("device", devices())
def test_empty_lists(device):
    for bits in BITS:
        codes, scales = _ops.blockwise_quantize([], bits, 256)
        assert codes == [] and scales == []
        codes, scales = _ops.blockwise_quantize([torch.empty(0, device=device)], bits, 256)
        assert codes[0].numel() == 0 and scales[0].numel() == 0
        _ops.blockwise_dequantize_([torch.empty(0, device=device)], codes, scales, bits, 256)
        assert float(_ops.dequantize_dot(codes, scales, [torch.empty(0, device=device)], bits, 256)) == 0.0


@pytest.mark.parametrize("bits", BITS)
@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 700), min_size=1, max_size=4),
       block=st.sampled_from([64, 66, 128, 130, 256]),
       scale=st.floats(1e-30, 1e30), seed=st.integers(0, 2**16))
def test_property_kernels_match_reference(bits, sizes, block, scale, seed):
    """Random shapes, magnitudes and even block sizes (not only powers of two)."""
    gen = torch.Generator().manual_seed(seed)
    x = [torch.randn(n, generator=gen) * scale for n in sizes]
    codes, scales = quantize_both(x, bits, block)
    recon = [torch.randn(n, generator=gen) * scale for n in sizes]
    ref_recon = [r.clone() for r in recon]
    c1 = delta(_ops, x, recon, bits, block)
    c2 = delta(reference, x, ref_recon, bits, block)
    assert_lists_equal(c1[0] + c1[1] + recon, c2[0] + c2[1] + ref_recon)


# ---- opcheck and bad input --------------------------------------------------------------------------

@requires_compiled
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("bits", BITS)
def test_opcheck(device, bits):
    ops = torch.ops.unlearn_ext
    x = [torch.randn(300, device=device), torch.randn(7, 9, device=device)]
    codes, scales = ops.blockwise_quantize(x, bits, 64)
    torch.library.opcheck(ops.blockwise_quantize, (x, bits, 64))
    torch.library.opcheck(ops.blockwise_dequantize_, ([torch.empty_like(t) for t in x], codes, scales, bits, 64))
    torch.library.opcheck(ops.delta_encode_, (x, [torch.zeros_like(t) for t in x], *_ops.empty_codes(x, bits, 64),
                                              bits, 64))
    torch.library.opcheck(ops.dequantize_axpy_, ([torch.randn_like(t) for t in x], 0.5, codes, scales, bits, 64))
    torch.library.opcheck(ops.dequantize_dot, (codes, scales, x, bits, 64))


@requires_compiled
def test_bad_inputs_have_messages():
    ops = torch.ops.unlearn_ext
    x = [torch.randn(100), torch.randn(10)]
    codes, scales = ops.blockwise_quantize(x, 8, 64)
    with pytest.raises(RuntimeError, match="bits must be 8"):
        ops.blockwise_quantize(x, 3, 64)
    for block in (32, 65, 8192):
        with pytest.raises(RuntimeError, match=r"block_size must be an even number in \[64, 4096\]"):
            ops.blockwise_quantize(x, 8, block)
    with pytest.raises(RuntimeError, match="expected float32, float16 or bfloat16"):
        ops.blockwise_quantize([torch.arange(5)], 8, 64)
    with pytest.raises(RuntimeError, match="share one dtype"):
        ops.blockwise_quantize([torch.randn(5), torch.randn(5).half()], 8, 64)
    out = [torch.empty_like(t) for t in x]
    with pytest.raises(RuntimeError, match="codes has 1 tensors but out has 2"):
        ops.blockwise_dequantize_(out, codes[:1], scales, 8, 64)
    with pytest.raises(RuntimeError, match="8-bit codes are"):
        ops.blockwise_dequantize_(out, [c.view(torch.uint8) for c in codes], scales, 8, 64)
    with pytest.raises(RuntimeError, match="same block_size"):
        ops.blockwise_dequantize_(out, codes, scales, 8, 128)
    with pytest.raises(RuntimeError, match="codes\\[0\\] has 100 entries"):
        ops.blockwise_dequantize_([torch.empty(50), torch.empty(10)], codes, scales, 8, 64)
    with pytest.raises(RuntimeError, match="scales\\[1\\] must be float32"):
        ops.blockwise_dequantize_(out, codes, [scales[0], scales[1].double()], 8, 64)
    with pytest.raises(RuntimeError, match="recon\\[0\\] must be float32"):
        ops.delta_encode_(x, [torch.zeros(100).half(), torch.zeros(10)], codes, scales, 8, 64)
    with pytest.raises(RuntimeError, match="target\\[1\\] has shape"):
        ops.delta_encode_(x, [torch.zeros(100), torch.zeros(11)], codes, scales, 8, 64)
    with pytest.raises(RuntimeError, match="codes\\[0\\] has dtype"):
        ops.delta_encode_(x, [torch.zeros(100), torch.zeros(10)], codes, scales, 4, 64)
    with pytest.raises(RuntimeError, match="alpha must be finite"):
        ops.dequantize_axpy_(out, float("nan"), codes, scales, 8, 64)


def test_reference_rejects_bad_block_sizes():
    with pytest.raises(ValueError, match="block_size"):
        reference.blockwise_quantize([torch.randn(4)], 8, 63)
    with pytest.raises(ValueError, match="bits"):
        reference.blockwise_quantize([torch.randn(4)], 2, 64)
