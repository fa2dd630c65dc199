"""Fake (meta) implementations of every op: output shapes and dtypes only, so the ops trace under
torch.compile and pass torch.library.opcheck. Registered only when the compiled ops exist."""
from __future__ import annotations

import torch

from ..reference.codecs import block_count, code_dtype, code_numel
from .loader import _C

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

    @torch.library.register_fake("unlearn_ext::apply_codes_")
    def _apply_codes_fake(params, codes, step_size):
        return None

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

def coded_like(tensors, bits, block_size):
    """(codes, scales) shaped as blockwise_quantize returns them; sizes from the reference (the one
    Python source of code and scale counts)."""
    codes = [t.new_empty((code_numel(t.numel(), bits),), dtype=code_dtype(bits)) for t in tensors]
    scales = [t.new_empty((block_count(t.numel(), block_size),), dtype=torch.float32) for t in tensors]
    return codes, scales


if _C is not None:
    @torch.library.register_fake("unlearn_ext::blockwise_quantize")
    def _blockwise_quantize_fake(x, bits, block_size):
        return coded_like(x, bits, block_size)

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
