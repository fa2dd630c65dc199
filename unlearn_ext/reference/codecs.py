"""Pure-PyTorch reference of the history codec ops (docs/design.md §5).

Same signatures and results as torch.ops.unlearn_ext.*: codes and scales bit for bit, and the
in-place outputs (dequantize, delta_encode's reconstruction, axpy) bit for bit too, because each
step below is one float32 operation in the same order as csrc/include/unlearn/codecs.h:

    absmax = max |x| over a block's finite elements       scale = absmax / qmax   (qmax 127 or 7)
    inv    = min(1 / scale, FLT_MAX)                      (once per block)
    code   = round_half_even(clamp(x * inv, -qmax, qmax)), 0 where scale == 0 or x is not finite
    deq    = float(code) * scale

Blocks are per tensor: tensor t is cut into ceil(numel / block_size) blocks in row-major order
and its last block may be short. int8 codes are a flat int8 tensor; int4 codes a flat uint8
tensor of ceil(numel / 2) bytes, element 2i in the low nibble and 2i + 1 in the high nibble
(two's-complement nibbles). Only dequantize_dot is compared with a tolerance (the order of its
float64 sums).

Codebooks (the `levels` argument; "linear" is the above). Both are our own choices, tuned on
Gaussian and Student-t(3) data at blocks 64 and 256 (see benchmarks/RESULTS.md for the figures):

  "normal" (bits 4): 16 levels, ascending: the 15 normal quantiles
        0.8 * Phi^-1(1/2 + 0.44 k / 7) / Phi^-1(0.94),   k = -7..7
      (0 and +-0.8 included) and the level +1. The scale is the block's *signed* absmax (the
      value of largest magnitude; +absmax wins a tie), so that value is reproduced exactly on
      level +1 and the other 15 levels serve the rest of the block, which is what makes it more
      accurate per byte than a codebook that must also hold -1. code = index 0..15 of the nearest
      level (the number of the 15 float32 midpoints below y = x * inv; ties go to the lower
      level), stored as unsigned nibbles; NaN/Inf and zero blocks get the index of level 0.
      Worst-case error |x - deq| <= 0.2 |scale| (a value at -|scale| against level -0.8; elsewhere
      half the largest gap, 0.1 |scale|), plus float roundings.
  "companded" (bits 8): quadratic companding, levels sign(k) |k| (127 + 3 |k|), k = -127..127, that
      is (k / 127)(1/4 + 3/4 |k| / 127) * 64516: steps 4x finer near 0 than near the absmax, which
      keeps the many small values of heavy-tailed blocks (whose absmax is far out) accurate while
      costing little on Gaussian ones. scale = absmax / 64516; code = the signed magnitude of the
      nearest level (ties to the smaller); |x - deq| <= 443 * scale (half the largest gap).
"""
from __future__ import annotations

import math

import torch

from ..codec_format import (COMPAND_MAX, LEVELS, MAX_BLOCK, MIN_BLOCK, block_count, check_codec_args,  # noqa: F401
                            code_dtype, code_numel, max_codebook_error, normal4_levels, qmax_of)
from .smoothing import FLOAT_DTYPES  # the kernels' input dtypes


def normal4_midpoints() -> torch.Tensor:
    """The 15 decision points between consecutive levels, float32 arithmetic as the kernels."""
    lv = normal4_levels()
    return (lv[1:] + lv[:-1]) * 0.5


def compand8_midpoints() -> torch.Tensor:
    """Midpoints between companded magnitudes j and j + 1 (j = 0..126): 3 j^2 + 130 j + 65."""
    j = torch.arange(127, dtype=torch.float32)
    return 3 * j * j + 130 * j + 65


def level_values(codes: torch.Tensor, levels: str) -> torch.Tensor:
    """float32 level of each int32 code."""
    if levels == "normal":
        return normal4_levels()[codes.long()]
    if levels == "companded":
        k = codes.abs()
        return (torch.sign(codes) * (k * (127 + 3 * k))).to(torch.float32)
    return codes.to(torch.float32)


def _check_floats(tensors, name):
    for i, t in enumerate(tensors):
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}[{i}] has dtype {t.dtype}; expected float32, float16 or bfloat16")
        if t.dtype != tensors[0].dtype:
            raise TypeError(f"all tensors in {name} must share one dtype")


def _blocks(flat: torch.Tensor, block_size: int) -> torch.Tensor:
    """(nblocks, block_size) view of a 1-D fp32 tensor, zero-padded (zeros change no absmax)."""
    n = flat.numel()
    pad = block_count(n, block_size) * block_size - n
    return torch.nn.functional.pad(flat, (0, pad)).reshape(-1, block_size)


def quantize_values(values: torch.Tensor, bits: int, block_size: int, levels: str = "linear"):
    """Codes (flat, int8 or packed uint8) and scales (float32) of one fp32 tensor."""
    flat = values.reshape(-1).to(torch.float32)
    finite = torch.isfinite(flat)
    blocks = _blocks(torch.where(finite, flat, torch.zeros_like(flat)), block_size)
    absmax = blocks.abs().amax(dim=1) if blocks.numel() else blocks.new_zeros(0)
    if levels == "normal":  # the signed absmax: negative only when -absmax occurs and +absmax does not
        positive = (blocks.amax(dim=1) == absmax) if blocks.numel() else absmax.bool()
        scales = torch.where(positive, absmax, -absmax)
    else:
        divisor = COMPAND_MAX if levels == "companded" else qmax_of(bits)
        scales = absmax / torch.tensor(divisor, dtype=torch.float32)
    nonzero = scales != 0
    inv = torch.clamp(1.0 / torch.where(nonzero, scales.abs(), torch.ones_like(scales)),
                      max=torch.finfo(torch.float32).max)
    inv = torch.where(nonzero, torch.where(scales < 0, -inv, inv), torch.zeros_like(inv))
    per_inv = inv.repeat_interleave(block_size)[: flat.numel()]
    ok = (per_inv != 0) & finite
    y = torch.where(ok, flat * per_inv, torch.zeros_like(flat))
    if levels == "normal":
        codes = torch.bucketize(y, normal4_midpoints(), right=False).to(torch.int32)  # midpoints < y
    elif levels == "companded":
        t = torch.clamp(y, -COMPAND_MAX, COMPAND_MAX).abs()
        k = torch.bucketize(t, compand8_midpoints(), right=False).to(torch.int32)
        codes = torch.where(y < 0, -k, k)
    else:
        q = qmax_of(bits)
        codes = torch.round(torch.clamp(y, -q, q)).to(torch.int32)  # torch.round: half to even
    return pack_codes(codes, bits), scales


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return codes.to(torch.int8)
    c = codes.to(torch.int32)
    if c.numel() % 2:
        c = torch.cat([c, c.new_zeros(1)])
    pairs = c.reshape(-1, 2) & 0xF
    return (pairs[:, 0] | (pairs[:, 1] << 4)).to(torch.uint8)


def unpack_codes(codes: torch.Tensor, bits: int, numel: int, levels: str = "linear") -> torch.Tensor:
    """int32 codes of one tensor (4-bit: signed nibbles, or unsigned indices for "normal")."""
    if bits == 8:
        return codes.reshape(-1).to(torch.int32)
    b = codes.reshape(-1).to(torch.int32)
    lo, hi = b & 0xF, b >> 4
    if levels != "normal":
        lo, hi = (lo ^ 0x8) - 8, (hi ^ 0x8) - 8
    return torch.stack([lo, hi], dim=1).reshape(-1)[:numel]


def dequantize_values(codes: torch.Tensor, scales: torch.Tensor, bits: int, block_size: int, numel: int,
                      levels: str = "linear"):
    """Flat fp32 dequantized values of one tensor."""
    c = level_values(unpack_codes(codes, bits, numel, levels), levels)
    per_elem = scales.reshape(-1).to(torch.float32).repeat_interleave(block_size)[:numel]
    return c * per_elem


def _check_coded(codes, scales, like, like_name, bits, block_size):
    if len(codes) != len(like) or len(scales) != len(like):
        raise ValueError(f"codes has {len(codes)} tensors and scales {len(scales)} but {like_name} has "
                         f"{len(like)}")
    want = code_dtype(bits)
    for i, (c, s, t) in enumerate(zip(codes, scales, like)):
        if c.dtype != want:
            raise TypeError(f"codes[{i}] has dtype {c.dtype}; {bits}-bit codes are {want}")
        if c.numel() != code_numel(t.numel(), bits):
            raise ValueError(f"codes[{i}] has {c.numel()} entries but {like_name}[{i}] needs "
                             f"{code_numel(t.numel(), bits)}")
        if s.dtype != torch.float32 or s.numel() != block_count(t.numel(), block_size):
            raise ValueError(f"scales[{i}] must be float32 with {block_count(t.numel(), block_size)} entries")


# ---- the ops -------------------------------------------------------------------------------------

def blockwise_quantize(x, bits: int, block_size: int, levels: str = "linear"):
    check_codec_args(bits, block_size, levels)
    _check_floats(x, "x")
    out = [quantize_values(t, bits, block_size, levels) for t in x]
    return [c for c, _ in out], [s for _, s in out]


def blockwise_dequantize_(out, codes, scales, bits: int, block_size: int, levels: str = "linear"):
    check_codec_args(bits, block_size, levels)
    _check_floats(out, "out")
    _check_coded(codes, scales, out, "out", bits, block_size)
    for o, c, s in zip(out, codes, scales):
        o.copy_(dequantize_values(c, s, bits, block_size, o.numel(), levels).reshape(o.shape).to(o.dtype))


def delta_encode_(target, recon, codes_out, scales_out, bits: int, block_size: int, levels: str = "linear"):
    check_codec_args(bits, block_size, levels)
    _check_floats(target, "target")
    if len(target) != len(recon):
        raise ValueError(f"target has {len(target)} tensors but recon has {len(recon)}")
    _check_coded(codes_out, scales_out, target, "target", bits, block_size)
    codes, scales = [], []
    for w, r in zip(target, recon):
        if r.dtype != torch.float32 or r.shape != w.shape:
            raise ValueError("recon must be float32 and shaped like target")
        delta = w.to(torch.float32) - r
        c, s = quantize_values(delta, bits, block_size, levels)
        r.add_(dequantize_values(c, s, bits, block_size, r.numel(), levels).reshape(r.shape))  # one rounding
        codes.append(c)
        scales.append(s)
    for dst, src in zip(codes_out + scales_out, codes + scales):
        dst.copy_(src.reshape(dst.shape))


def dequantize_axpy_(y, alpha: float, codes, scales, bits: int, block_size: int, levels: str = "linear"):
    check_codec_args(bits, block_size, levels)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    _check_floats(y, "y")
    _check_coded(codes, scales, y, "y", bits, block_size)
    a = torch.tensor(alpha, dtype=torch.float32)
    for t, c, s in zip(y, codes, scales):
        d = dequantize_values(c, s, bits, block_size, t.numel(), levels).reshape(t.shape)
        t.copy_((t.to(torch.float32) + a * d).to(t.dtype))


def dequantize_dot(codes, scales, v, bits: int, block_size: int, levels: str = "linear"):
    check_codec_args(bits, block_size, levels)
    _check_floats(v, "v")
    _check_coded(codes, scales, v, "v", bits, block_size)
    # As the kernels: per block, the float64 sum of level * value (each product exact in float64),
    # times the block's scale; the blocks' terms summed in float64.
    total = torch.zeros((), dtype=torch.float64)
    for c, s, t in zip(codes, scales, v):
        n = t.numel()
        products = level_values(unpack_codes(c, bits, n, levels), levels).to(torch.float64) * \
            t.reshape(-1).to(torch.float64)
        block_of = torch.arange(n, device=products.device) // block_size
        sums = torch.zeros(block_count(n, block_size), dtype=torch.float64, device=products.device)
        sums.index_add_(0, block_of, products)
        total += (sums * s.reshape(-1).to(torch.float64)).sum().cpu()
    return total.to(v[0].device if v else "cpu")
