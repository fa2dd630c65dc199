"""Thin wrappers over torch.ops.unlearn_ext.*, their fake (meta) implementations, and the choice
of backend: the compiled extension when it is importable, else the pure-PyTorch reference.

Every wrapper has the op's own signature; argument checks with friendly messages live in the public
modules (smoothing.py), so this file stays one line per op.
"""
from __future__ import annotations

import os
import warnings

import torch

from . import reference

_C = None
_LOAD_ERROR: Exception | None = None
if os.environ.get("UNLEARN_EXT_BACKEND", "").lower() != "reference":
    try:
        from . import _C  # noqa: F811  (registers the ops with the dispatcher on import)
    except ImportError as exc:  # not built: the reference serves every op
        _LOAD_ERROR = exc

_warned = False


def compiled() -> bool:
    """True when the compiled extension is loaded."""
    return _C is not None


def cuda_built() -> bool:
    return _C is not None and _C.built_with_cuda()


def backend() -> str:
    """Which implementation serves the ops: 'compiled (cpu+cuda)', 'compiled (cpu)' or 'reference'."""
    if _C is None:
        return "reference"
    return "compiled (cpu+cuda)" if _C.built_with_cuda() else "compiled (cpu)"


def check_device(device: torch.device) -> None:
    """Refuses devices the loaded build has no kernels for, with the way out in the message."""
    if _C is None:
        return  # the reference runs on any device torch supports
    if device.type == "cuda" and not _C.built_with_cuda():
        raise RuntimeError(
            "unlearn_ext was built without CUDA kernels but got a CUDA tensor. Rebuild with a CUDA "
            "build of torch and nvcc (UNLEARN_EXT_CUDA=1 CUDA_HOME=/usr/local/cuda pip install "
            "--no-build-isolation -e .), or move the tensors to the CPU."
        )
    if device.type not in ("cpu", "cuda", "meta"):
        raise RuntimeError(f"unlearn_ext has no kernels for device type '{device.type}'")


def _impl(name: str):
    """The op itself when compiled, else the reference function of the same name (one warning)."""
    global _warned
    if _C is not None:
        return getattr(torch.ops.unlearn_ext, name)
    if not _warned:
        _warned = True
        why = f" ({_LOAD_ERROR})" if _LOAD_ERROR is not None else " (UNLEARN_EXT_BACKEND=reference)"
        warnings.warn(f"unlearn_ext: compiled extension not loaded{why}; using the pure-PyTorch "
                      "reference, which is correct but slow.", RuntimeWarning, stacklevel=3)
    return getattr(reference, name)


# ---- one-line wrappers ---------------------------------------------------------------------------

def philox_bits(element_index, draws, seed, offset):
    return _impl("philox_bits")(element_index, draws, seed, offset)


def philox_uniform(element_index, draws, seed, offset):
    return _impl("philox_uniform")(element_index, draws, seed, offset)


def philox_bernoulli(element_index, draws, p, seed, offset):
    return _impl("philox_bernoulli")(element_index, draws, p, seed, offset)


def quantize_analytic(grads, beta, count_below):
    return _impl("quantize_analytic")(grads, beta, count_below)


def quantize_mc(grads, tau, sigma, n0, n, radius_table, seed, offset, count_below):
    return _impl("quantize_mc")(grads, tau, sigma, n0, n, radius_table, seed, offset, count_below)


def quantized_step_analytic_(params, grads, beta, step_size, count_below, check_finite):
    return _impl("quantized_step_analytic_")(params, grads, beta, step_size, count_below, check_finite)


def quantized_step_mc_(params, grads, tau, sigma, n0, n, radius_table, seed, offset, step_size,
                       count_below, check_finite):
    return _impl("quantized_step_mc_")(params, grads, tau, sigma, n0, n, radius_table, seed, offset,
                                       step_size, count_below, check_finite)


def vote_accumulate_(votes, grads, tau):
    return _impl("vote_accumulate_")(votes, grads, tau)


def vote_finalize(selection_votes, estimation_votes, n0, n, radius_table, sigma, count_below):
    return _impl("vote_finalize")(selection_votes, estimation_votes, n0, n, radius_table, sigma,
                                  count_below)


def fragile_compact(values, radii, threshold):
    if not values and not radii:  # no tensor to dispatch on: the answer is empty either way
        return reference.fragile_compact([], [], threshold)
    return _impl("fragile_compact")(values, radii, threshold)
# ---- history codecs (DESIGN section 5) -------------------------------------------------------------

def blockwise_quantize(x, bits, block_size):
    return _impl("blockwise_quantize")(x, bits, block_size)


def blockwise_dequantize_(out, codes, scales, bits, block_size):
    return _impl("blockwise_dequantize_")(out, codes, scales, bits, block_size)


def delta_encode_(target, recon, codes, scales, bits, block_size):
    return _impl("delta_encode_")(target, recon, codes, scales, bits, block_size)


def empty_codes(tensors, bits, block_size):
    """Preallocated (codes, scales) for delta_encode_, sized as blockwise_quantize returns them."""
    return _coded_like(tensors, bits, block_size)


def dequantize_axpy_(y, alpha, codes, scales, bits, block_size):
    return _impl("dequantize_axpy_")(y, alpha, codes, scales, bits, block_size)


def dequantize_dot(codes, scales, v, bits, block_size):
    return _impl("dequantize_dot")(codes, scales, v, bits, block_size)


# ---- fake implementations (shapes only), so the ops trace under torch.compile ----------------------

def _stats_like(t: torch.Tensor):
    return t.new_empty((), dtype=torch.float32), t.new_empty((3,), dtype=torch.int64)


def _codes_radii_like(tensors):
    return ([t.new_empty(t.shape, dtype=torch.int8) for t in tensors],
            [t.new_empty(t.shape, dtype=torch.float32) for t in tensors])


if _C is not None:
    def _rng_fake(dtype):
        def fake(element_index, draws, *args):
            return element_index.new_empty((*element_index.shape, draws), dtype=dtype)
        return fake

    torch.library.register_fake("unlearn_ext::philox_bits")(_rng_fake(torch.int32))
    torch.library.register_fake("unlearn_ext::philox_uniform")(_rng_fake(torch.float64))
    torch.library.register_fake("unlearn_ext::philox_bernoulli")(_rng_fake(torch.bool))

    @torch.library.register_fake("unlearn_ext::quantize_analytic")
    def _quantize_analytic_fake(grads, beta, count_below):
        return (*_codes_radii_like(grads), *_stats_like(grads[0]))

    @torch.library.register_fake("unlearn_ext::quantize_mc")
    def _quantize_mc_fake(grads, tau, sigma, n0, n, radius_table, seed, offset, count_below):
        return (*_codes_radii_like(grads), *_stats_like(radius_table))

    @torch.library.register_fake("unlearn_ext::quantized_step_analytic_")
    def _step_analytic_fake(params, grads, beta, step_size, count_below, check_finite):
        return _stats_like(grads[0])

    @torch.library.register_fake("unlearn_ext::quantized_step_mc_")
    def _step_mc_fake(params, grads, tau, sigma, n0, n, radius_table, seed, offset, step_size,
                      count_below, check_finite):
        return _stats_like(radius_table)

    @torch.library.register_fake("unlearn_ext::vote_accumulate_")
    def _vote_accumulate_fake(votes, grads, tau):
        return votes[0].new_empty((), dtype=torch.int64)

    @torch.library.register_fake("unlearn_ext::vote_finalize")
    def _vote_finalize_fake(selection_votes, estimation_votes, n0, n, radius_table, sigma, count_below):
        shapes = [v[0] for v in selection_votes]
        return (*_codes_radii_like(shapes), *_stats_like(radius_table))

    @torch.library.register_fake("unlearn_ext::fragile_compact")
    def _fragile_compact_fake(values, radii, threshold):
        count = torch.library.get_ctx().new_dynamic_size()  # how many are fragile is data-dependent
        like = values[0]
        return (like.new_empty((count,), dtype=torch.int64), like.new_empty((count,), dtype=torch.float32),
                like.new_empty((count,), dtype=torch.float32))


# ---- fakes of the history codecs: codes and scales are flat, sized from numel and block_size -------

def _coded_like(tensors, bits, block_size):
    codes = [t.new_empty(((t.numel() if bits == 8 else (t.numel() + 1) // 2),),
                         dtype=torch.int8 if bits == 8 else torch.uint8) for t in tensors]
    scales = [t.new_empty((-(-t.numel() // block_size),), dtype=torch.float32) for t in tensors]
    return codes, scales


if _C is not None:
    @torch.library.register_fake("unlearn_ext::blockwise_quantize")
    def _blockwise_quantize_fake(x, bits, block_size):
        return _coded_like(x, bits, block_size)

    @torch.library.register_fake("unlearn_ext::blockwise_dequantize_")
    def _blockwise_dequantize_fake(out, codes, scales, bits, block_size):
        return None

    @torch.library.register_fake("unlearn_ext::delta_encode_")
    def _delta_encode_fake(target, recon, codes, scales, bits, block_size):
        return None

    @torch.library.register_fake("unlearn_ext::dequantize_axpy_")
    def _dequantize_axpy_fake(y, alpha, codes, scales, bits, block_size):
        return None

    @torch.library.register_fake("unlearn_ext::dequantize_dot")
    def _dequantize_dot_fake(codes, scales, v, bits, block_size):
        return (v[0] if v else codes[0]).new_empty((), dtype=torch.float64)
