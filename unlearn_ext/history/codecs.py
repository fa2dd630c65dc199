"""Codecs of the history store (DESIGN section 5): how one named tensor list becomes flat arrays.

  fp32            exact
  fp16 / bf16     a cast; relative error <= 2^-11 (fp16, inside its range) or 2^-8 (bf16)
  int8 / int4     blockwise absmax (unlearn_ext ops): |x - deq| <= scale / 2 + 2^-22 absmax per
                  element, where scale = absmax(block) / 127 (int8) or / 7 (int4) (half a
                  quantization step plus the float roundings of 1 / scale, x * (1 / scale), deq)

An encoded field is a list of flat CPU-or-device tensors ("arrays"), in a fixed order: one value
array per tensor for fp codecs; all code arrays, then all scale arrays, for int codecs. That order
is what the on-disk format stores, so a reader needs only the codec and the shapes to decode.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import ops as _ops
from ..reference.codecs import block_count, code_dtype, code_numel

CODECS = ("fp32", "fp16", "bf16", "int8", "int4")
FP_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BITS = {"int8": 8, "int4": 4}
DEFAULT_BLOCK = 256

# Kinds of an encoded field: values stored directly, an exact fp32 keyframe, or a closed-loop delta.
PLAIN, KEYFRAME, DELTA = "plain", "keyframe", "delta"


def check_codec(codec: str) -> None:
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; expected one of {', '.join(CODECS)}")


@dataclass
class Encoded:
    """One field of one recorded step."""
    codec: str
    kind: str                 # PLAIN, KEYFRAME or DELTA
    arrays: list              # flat tensors, order described in the module docstring

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() for a in self.arrays)


def array_count(codec: str, kind: str, tensors: int) -> int:
    return 2 * tensors if (codec in BITS and kind != KEYFRAME) else tensors


def array_specs(codec: str, kind: str, shapes, block_size: int):
    """(dtype, numel) of each array of an encoded field, in storage order."""
    numels = [math.prod(s) for s in shapes]
    if kind == KEYFRAME:
        return [(torch.float32, n) for n in numels]
    if codec in FP_DTYPES:
        return [(FP_DTYPES[codec], n) for n in numels]
    bits = BITS[codec]
    codes = [(code_dtype(bits), code_numel(n, bits)) for n in numels]
    return codes + [(torch.float32, block_count(n, block_size)) for n in numels]


def payload_bytes(codec: str, kind: str, shapes, block_size: int) -> int:
    return sum(d.itemsize * n for d, n in array_specs(codec, kind, shapes, block_size))


def encode_plain(tensors, codec: str, block_size: int) -> Encoded:
    """Stores values directly: a cast for fp codecs, blockwise quantization for int codecs."""
    if codec in FP_DTYPES:
        return Encoded(codec, PLAIN, [t.detach().reshape(-1).to(FP_DTYPES[codec], copy=True) for t in tensors])
    codes, scales = _ops.blockwise_quantize([t.detach() for t in tensors], BITS[codec], block_size)
    return Encoded(codec, PLAIN, list(codes) + list(scales))


def encode_keyframe(tensors, codec: str) -> Encoded:
    return Encoded(codec, KEYFRAME, [t.detach().reshape(-1).to(torch.float32, copy=True) for t in tensors])


def encode_delta(tensors, recon, codec: str, block_size: int) -> Encoded:
    """Closed loop: quantizes target - recon and moves recon (fp32, in place) by the dequantized delta."""
    codes, scales = _ops.empty_codes(tensors, BITS[codec], block_size)
    _ops.delta_encode_([t.detach() for t in tensors], recon, codes, scales, BITS[codec], block_size)
    return Encoded(codec, DELTA, list(codes) + list(scales))


def decode_into(enc: Encoded, out, block_size: int) -> None:
    """out (tensors shaped like the recorded ones) <- the values of a PLAIN or KEYFRAME field."""
    n = len(out)
    if enc.kind == KEYFRAME or enc.codec in FP_DTYPES:
        for o, a in zip(out, enc.arrays):
            o.copy_(a.reshape(o.shape))
        return
    arrays = [a.to(out[0].device) for a in enc.arrays]
    _ops.blockwise_dequantize_(out, arrays[:n], arrays[n:], BITS[enc.codec], block_size)


def apply_delta(enc: Encoded, recon, block_size: int) -> None:
    """recon (fp32) += deq(delta): bit-identical to the encoder's own reconstruction update."""
    n = len(recon)
    arrays = [a.to(recon[0].device) for a in enc.arrays]
    _ops.dequantize_axpy_(recon, 1.0, arrays[:n], arrays[n:], BITS[enc.codec], block_size)


def error_stats(approx, exact) -> tuple[float, float]:
    """(max |approx - exact|, RMS of approx - exact) over a whole tensor list, from fp32
    differences, one tensor at a time (aminmax and a dot product: vectorized single passes; a
    multi-tensor inf-norm was ~10x slower on CPU), with one device-to-host transfer."""
    maxes, sums, count = [], [], 0
    for a, e in zip(approx, exact):
        if e.numel() == 0:
            continue
        d = (a.detach().float() - e.detach().float()).reshape(-1)
        lo, hi = torch.aminmax(d)
        maxes.append(torch.maximum(-lo, hi).double())
        sums.append(torch.dot(d, d).double())
        count += d.numel()
    if not count:
        return 0.0, 0.0
    max_err, sq = torch.stack([torch.stack(maxes).max(), torch.stack(sums).sum()]).tolist()
    return max_err, math.sqrt(sq / count)
