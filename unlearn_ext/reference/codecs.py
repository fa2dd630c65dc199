"""Pure-PyTorch reference of the history codec ops (DESIGN section 5).

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
(two's-complement nibbles). Only dequantize_dot is compared with a tolerance (summation order).
"""
from __future__ import annotations

import math

import torch

from .smoothing import FLOAT_DTYPES  # the kernels' input dtypes

MIN_BLOCK, MAX_BLOCK = 64, 4096


def check_codec_args(bits: int, block_size: int) -> None:
    if bits not in (8, 4):
        raise ValueError(f"bits must be 8 (int8 codes) or 4 (int4 codes), got {bits}")
    if not (MIN_BLOCK <= block_size <= MAX_BLOCK) or block_size % 2:
        raise ValueError(f"block_size must be an even number in [{MIN_BLOCK}, {MAX_BLOCK}], got {block_size}")


def qmax_of(bits: int) -> float:
    return 127.0 if bits == 8 else 7.0


def code_numel(numel: int, bits: int) -> int:
    return numel if bits == 8 else (numel + 1) // 2


def block_count(numel: int, block_size: int) -> int:
    return -(-numel // block_size)


def code_dtype(bits: int) -> torch.dtype:
    """int8 codes are int8; int4 codes are packed two per uint8 byte."""
    return torch.int8 if bits == 8 else torch.uint8


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


def quantize_values(values: torch.Tensor, bits: int, block_size: int):
    """Codes (flat, int8 or packed uint8) and scales (float32) of one fp32 tensor."""
    q = qmax_of(bits)
    flat = values.reshape(-1).to(torch.float32)
    finite = torch.isfinite(flat)
    blocks = _blocks(torch.where(finite, flat, torch.zeros_like(flat)), block_size)
    scales = blocks.abs().amax(dim=1) if blocks.numel() else blocks.new_zeros(0)
    scales = scales / torch.tensor(q, dtype=torch.float32)
    nonzero = scales > 0
    inv = torch.where(nonzero, 1.0 / torch.where(nonzero, scales, torch.ones_like(scales)), torch.zeros_like(scales))
    inv = torch.clamp(inv, max=torch.finfo(torch.float32).max)
    per_inv = inv.repeat_interleave(block_size)[: flat.numel()]
    ok = (per_inv > 0) & finite
    y = torch.where(ok, flat * per_inv, torch.zeros_like(flat))
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


def unpack_codes(codes: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """int32 codes of one tensor."""
    if bits == 8:
        return codes.reshape(-1).to(torch.int32)
    b = codes.reshape(-1).to(torch.int32)
    lo = ((b & 0xF) ^ 0x8) - 8
    hi = ((b >> 4) ^ 0x8) - 8
    return torch.stack([lo, hi], dim=1).reshape(-1)[:numel]


def dequantize_values(codes: torch.Tensor, scales: torch.Tensor, bits: int, block_size: int, numel: int):
    """Flat fp32 dequantized values of one tensor."""
    c = unpack_codes(codes, bits, numel).to(torch.float32)
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

def blockwise_quantize(x, bits: int, block_size: int):
    check_codec_args(bits, block_size)
    _check_floats(x, "x")
    out = [quantize_values(t, bits, block_size) for t in x]
    return [c for c, _ in out], [s for _, s in out]


def blockwise_dequantize_(out, codes, scales, bits: int, block_size: int):
    check_codec_args(bits, block_size)
    _check_floats(out, "out")
    _check_coded(codes, scales, out, "out", bits, block_size)
    for o, c, s in zip(out, codes, scales):
        o.copy_(dequantize_values(c, s, bits, block_size, o.numel()).reshape(o.shape).to(o.dtype))


def delta_encode_(target, recon, codes_out, scales_out, bits: int, block_size: int):
    check_codec_args(bits, block_size)
    _check_floats(target, "target")
    if len(target) != len(recon):
        raise ValueError(f"target has {len(target)} tensors but recon has {len(recon)}")
    _check_coded(codes_out, scales_out, target, "target", bits, block_size)
    codes, scales = [], []
    for w, r in zip(target, recon):
        if r.dtype != torch.float32 or r.shape != w.shape:
            raise ValueError("recon must be float32 and shaped like target")
        delta = w.to(torch.float32) - r
        c, s = quantize_values(delta, bits, block_size)
        r.add_(dequantize_values(c, s, bits, block_size, r.numel()).reshape(r.shape))  # one rounding
        codes.append(c)
        scales.append(s)
    for dst, src in zip(codes_out + scales_out, codes + scales):
        dst.copy_(src.reshape(dst.shape))


def dequantize_axpy_(y, alpha: float, codes, scales, bits: int, block_size: int):
    check_codec_args(bits, block_size)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    _check_floats(y, "y")
    _check_coded(codes, scales, y, "y", bits, block_size)
    a = torch.tensor(alpha, dtype=torch.float32)
    for t, c, s in zip(y, codes, scales):
        d = dequantize_values(c, s, bits, block_size, t.numel()).reshape(t.shape)
        t.copy_((t.to(torch.float32) + a * d).to(t.dtype))


def dequantize_dot(codes, scales, v, bits: int, block_size: int):
    check_codec_args(bits, block_size)
    _check_floats(v, "v")
    _check_coded(codes, scales, v, "v", bits, block_size)
    total = torch.zeros((), dtype=torch.float64)
    for c, s, t in zip(codes, scales, v):
        d = dequantize_values(c, s, bits, block_size, t.numel()).to(torch.float64)
        total += (d * t.reshape(-1).to(torch.float64)).sum().cpu()
    return total.to(v[0].device if v else "cpu")
