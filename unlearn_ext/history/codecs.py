"""Codecs of the history store (docs/design.md §5): how one named tensor list becomes flat arrays.

  fp32            exact
  fp16 / bf16     a cast; relative error <= 2^-11 (fp16, inside its range) or 2^-8 (bf16)
  int8 / int4     blockwise absmax (unlearn_ext ops): |x - deq| <= scale / 2 + 2^-22 absmax per
                  element, where scale = absmax(block) / 127 (int8) or / 7 (int4) (half a
                  quantization step plus the float roundings of 1 / scale, x * (1 / scale), deq)
  nf4             4-bit normal-quantile codebook (our levels, not bitsandbytes' table; see
                  reference/codecs.py), blockwise signed-absmax scale: lower RMS error than int4
                  at the same bytes on Gaussian and heavy-tailed data; |x - deq| <= 0.2 absmax
  compand8        8-bit quadratically companded levels (our choice): finer steps near 0, lower
                  RMS error than int8 on heavy-tailed data and on Gaussian data;
                  |x - deq| <= (443 / 64516) absmax ~ 0.0069 absmax
The bounds of the quantized codecs, as a fraction of the block's absmax, are max_error_fraction.
  exact           1-D tensors of any length and dtype (integer or float), stored bit for bit: for
                  records whose size varies per step (PCMU's packed codes and fragile sets)

An encoded field is a list of flat CPU-or-device tensors ("arrays"), in a fixed order: one value
array per tensor for fp codecs; all code arrays, then all scale arrays, for int codecs. That order
is what the on-disk format stores, so a reader needs only the codec and the shapes to decode.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from .. import ops as _ops
from ..codec_format import block_count, code_dtype, code_numel, max_codebook_error

CODECS = ("fp32", "fp16", "bf16", "int8", "int4", "nf4", "compand8")
FP_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BITS = {"int8": 8, "int4": 4, "nf4": 4, "compand8": 8}             # the quantized codecs
LEVELS = {"int8": "linear", "int4": "linear", "nf4": "normal", "compand8": "companded"}
DEFAULT_BLOCK = 256
EXACT = "exact"  # not a value codec (no shapes, no quantization): a field's tensors stored as they are

# Kinds of an encoded field: values stored directly, an exact fp32 keyframe, or a closed-loop delta.
PLAIN, KEYFRAME, DELTA = "plain", "keyframe", "delta"


def check_codec(codec: str) -> None:
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; expected one of {', '.join(CODECS)}")


def max_error_fraction(codec: str) -> float:
    """Bound of |x - deq| / absmax(block) of a quantized codec, before float roundings (which add
    at most 2^-22 absmax): half a step for int codecs, the codebook's covering radius otherwise."""
    return max_codebook_error(BITS[codec], LEVELS[codec])


@dataclass
class Encoded:
    """One field of one recorded step."""
    codec: str
    kind: str                 # PLAIN, KEYFRAME or DELTA
    arrays: list              # flat tensors, order described in the module docstring

    @property
    def nbytes(self) -> int:
        # (the arrays' sizes never change, a move to another tier keeps them: counted once, as a replay
        # asks at every step it reads)
        if self._nbytes is None:
            self._nbytes = sum(a.numel() * a.element_size() for a in self.arrays)
        return self._nbytes

    _nbytes = None


def payload_digest(enc: Encoded) -> str:
    """A SHA-256 digest (first 128 bits, hex) of an encoded field (codec, kind, each array's dtype,
    length and bytes), taken once when a step is recorded: two stores that recorded the same values
    with the same codec hold the same digests, so comparing histories needs no decoding (one hash
    pass over the codes, e.g. a quarter of the fp32 bytes for int8; SHA-256 rather than BLAKE2b: it
    hashed 1.6x faster on the CPU we measured, which has SHA instructions)."""
    h = hashlib.sha256(f"{enc.codec};{enc.kind}".encode())
    for a in enc.arrays:
        a = a.detach().contiguous().cpu()
        h.update(f";{a.dtype};{a.numel()};".encode())
        if a.numel():
            h.update(a.view(torch.uint8).numpy())  # the array's own buffer: no copy
    return h.hexdigest()[:32]


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
    codes, scales = _ops.blockwise_quantize([t.detach() for t in tensors], BITS[codec], block_size, LEVELS[codec])
    return Encoded(codec, PLAIN, list(codes) + list(scales))


def encode_exact(tensors) -> Encoded:
    """Stores 1-D tensors as they are (their own dtype and length): decoding returns the same bits."""
    return Encoded(EXACT, PLAIN, [t.detach().reshape(-1).to("cpu", copy=True) for t in tensors])


def encode_keyframe(tensors, codec: str) -> Encoded:
    return Encoded(codec, KEYFRAME, [t.detach().reshape(-1).to(torch.float32, copy=True) for t in tensors])


def encode_delta(tensors, recon, codec: str, block_size: int) -> Encoded:
    """Closed loop: quantizes target - recon and moves recon (fp32, in place) by the dequantized delta."""
    codes, scales = _ops.empty_codes(tensors, BITS[codec], block_size)
    _ops.delta_encode_([t.detach() for t in tensors], recon, codes, scales, BITS[codec], block_size, LEVELS[codec])
    return Encoded(codec, DELTA, list(codes) + list(scales))


def decode_into(enc: Encoded, out, block_size: int) -> None:
    """out (tensors shaped like the recorded ones) <- the values of a PLAIN or KEYFRAME field."""
    n = len(out)
    if enc.kind == KEYFRAME or enc.codec in FP_DTYPES:
        for o, a in zip(out, enc.arrays):
            o.copy_(a.reshape(o.shape))
        return
    arrays = _values_of(enc, out[0].device)
    _ops.blockwise_dequantize_(out, arrays[:n], arrays[n:], BITS[enc.codec], block_size, LEVELS[enc.codec])


def decode_many_into(encs, outs, block_size: int) -> None:
    """decode_into(encs[k], outs[k]) for every k, the quantized ones (plain fields and deltas, whose
    values are their dequantized codes) in one dequantize call: a reader of many records (a replay)
    pays the call once. The same values as one call per record (each element is dequantized alone)."""
    quantized = [k for k, enc in enumerate(encs) if enc.kind != KEYFRAME and enc.codec in BITS]
    for k in sorted(set(range(len(encs))) - set(quantized)):
        decode_into(encs[k], outs[k], block_size)
    groups = {}  # codec -> (outputs, codes, scales): one call per codec (a store has one per field)
    for k in quantized:
        n, arrays = len(outs[k]), _values_of(encs[k], outs[k][0].device)
        out, codes, scales = groups.setdefault(encs[k].codec, ([], [], []))
        out += outs[k]
        codes += arrays[:n]
        scales += arrays[n:]
    for codec, (out, codes, scales) in groups.items():
        _ops.blockwise_dequantize_(out, codes, scales, BITS[codec], block_size, LEVELS[codec])


def apply_delta(enc: Encoded, recon, block_size: int) -> None:
    """recon (fp32) += deq(delta): bit-identical to the encoder's own reconstruction update."""
    n = len(recon)
    arrays = _values_of(enc, recon[0].device)
    _ops.dequantize_axpy_(recon, 1.0, arrays[:n], arrays[n:], BITS[enc.codec], block_size, LEVELS[enc.codec])


def _values_of(enc: Encoded, device) -> list:
    """The arrays of an fp-coded field, or the codes and the scales of an int-coded one, on `device`
    (the stored list itself when they are all there already: the common case, checked without a call per array)."""
    if all(a.device == device for a in enc.arrays):
        return enc.arrays
    return [a.to(device) for a in enc.arrays]


class EncodedField:
    """Read-only view of one plain field of one recorded step, in its stored (compressed) form.

    Its products run on the codes, never building the fp32 values of the whole field: this is how
    DeltaGrad's L-BFGS two-loop recursion works on the stored gradient history,

        for each stored pair i (newest first):  a_i = rho_i * g_i.dot(q);  g_i.axpy_(q, -a_i)

    with at most one step's codes in memory at a time. Results equal decoding first and then
    computing densely, up to float roundings (dot: float32 sums within a block, float64 across
    blocks and tensors; axpy_: one float32 multiply-add per element, as the op documents).

    codec, kind: as stored (kind is always "plain" here); shapes: the field's tensor shapes;
    arrays: the stored flat arrays (module docstring), shared with the store: do not modify them.
    """

    def __init__(self, enc: Encoded, shapes, block_size: int):
        if enc.kind != PLAIN:
            raise ValueError(f"EncodedField holds plain fields only, got kind {enc.kind!r}")
        self.codec, self.kind, self.arrays = enc.codec, enc.kind, tuple(enc.arrays)
        self.shapes, self.block_size = [tuple(s) for s in shapes], block_size
        self._enc = enc

    @property
    def nbytes(self) -> int:
        return self._enc.nbytes

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def __repr__(self) -> str:
        return (f"EncodedField(codec={self.codec!r}, tensors={len(self.shapes)}, numel={self.numel}, "
                f"nbytes={self.nbytes})")

    def _check_like(self, ts, what: str) -> list:
        ts = list(ts)
        if len(ts) != len(self.shapes):
            raise ValueError(f"{what} has {len(ts)} tensors; the field has {len(self.shapes)}")
        for i, (t, s) in enumerate(zip(ts, self.shapes)):
            if tuple(t.shape) != s:
                raise ValueError(f"{what}[{i}] has shape {tuple(t.shape)}; the field's tensor {i} has shape {s}")
        return ts

    def dot(self, v) -> float:
        """<values, v> as a Python float (float64 accumulation). v: tensors shaped like the field
        (float32, float16 or bfloat16 for int codecs, which use ops.dequantize_dot on the codes)."""
        v = self._check_like(v, "v")
        if not v:
            return 0.0
        arrays = _values_of(self._enc, v[0].device)
        if self.codec in BITS:
            n = len(v)
            return float(_ops.dequantize_dot(arrays[:n], arrays[n:], v, BITS[self.codec], self.block_size,
                                             LEVELS[self.codec]))
        # fp codecs: the stored values are exact in float64, so this is a plain float64 dot.
        parts = [torch.dot(a.double(), t.detach().reshape(-1).double()) for a, t in zip(arrays, v)]
        return float(torch.stack(parts).sum())

    def axpy_(self, y, alpha: float) -> list:
        """y += alpha * values, in place (math in float32, as ops.dequantize_axpy_); returns y."""
        y = self._check_like(y, "y")
        alpha = float(alpha)
        if not math.isfinite(alpha):
            raise ValueError(f"alpha must be finite, got {alpha}")
        if not y:
            return y
        arrays = _values_of(self._enc, y[0].device)
        if self.codec in BITS:
            n = len(y)
            _ops.dequantize_axpy_(y, alpha, arrays[:n], arrays[n:], BITS[self.codec], self.block_size,
                                  LEVELS[self.codec])
            return y
        a = torch.tensor(alpha, dtype=torch.float32)
        for t, x in zip(y, arrays):
            t.copy_(t.float() + a * x.float().reshape(t.shape))  # float32 math, as the op
        return y

    def decode(self, out=None, *, device=None) -> list:
        """The fp32 values (or into `out`, tensors shaped like the field, which is returned)."""
        if out is None:
            dev = torch.device(device) if device is not None else torch.device("cpu")
            out = [torch.empty(s, dtype=torch.float32, device=dev) for s in self.shapes]
        out = self._check_like(out, "out")
        if out:
            decode_into(self._enc, out, self.block_size)
        return out


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
