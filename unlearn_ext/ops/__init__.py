"""The raw ops: one-line wrappers over torch.ops.unlearn_ext.* with the op's own signature, served by
the compiled kernels or, when the extension is not built, by the pure-PyTorch reference
(loader.py). Argument checks with friendly messages live in the public modules (rng.py,
pcmu/smoothing.py, history/codecs.py), so this file stays one line per op. Fake (meta)
implementations for torch.compile are in fakes.py.
"""
from __future__ import annotations

from .. import reference
from .loader import backend, check_device, compiled, cuda_built, impl
from . import fakes  # noqa: F401  (registers the fake implementations)

# ---- one-line wrappers ---------------------------------------------------------------------------

def philox_bits(element_index, draws, seed, offset):
    return impl("philox_bits")(element_index, draws, seed, offset)


def philox_uniform(element_index, draws, seed, offset):
    return impl("philox_uniform")(element_index, draws, seed, offset)


def philox_bernoulli(element_index, draws, p, seed, offset):
    return impl("philox_bernoulli")(element_index, draws, p, seed, offset)


# An op whose tensor arguments are all empty lists has no tensor to dispatch on (the dispatcher
# refuses the call), so these wrappers answer that case themselves, as the kernels would: with
# the kernels' checks of the other arguments (shared with the fakes), then the empty result.

def quantize_analytic(grads, beta, count_below):
    if not grads:  # empty codes and radii, min_radius inf, counts 0 (as quantize_mc's kernel)
        fakes.check_beta(beta)
        return reference.quantize_analytic([], beta, count_below)
    return impl("quantize_analytic")(grads, beta, count_below)


def quantize_mc(grads, tau, sigma, n0, n, radius_table, seed, offset, count_below):
    return impl("quantize_mc")(grads, tau, sigma, n0, n, radius_table, seed, offset, count_below)


def quantized_step_analytic_(params, grads, beta, step_size, count_below, check_finite):
    if not params and not grads:  # refused, as quantized_step_mc_'s kernel refuses it
        fakes.check_beta(beta)
        fakes.check_step(params, grads, step_size)
    return impl("quantized_step_analytic_")(params, grads, beta, step_size, count_below, check_finite)


def quantized_step_mc_(params, grads, tau, sigma, n0, n, radius_table, seed, offset, step_size,
                       count_below, check_finite):
    return impl("quantized_step_mc_")(params, grads, tau, sigma, n0, n, radius_table, seed, offset,
                                       step_size, count_below, check_finite)


def apply_codes_(params, codes, step_size):
    return impl("apply_codes_")(params, codes, step_size)


def vote_accumulate_(votes, grads, tau):
    if not votes and not grads:  # nothing to count: 0 non-finite gradients (an int64 CPU scalar)
        fakes.check_tau(tau)
        return reference.vote_accumulate_([], [], tau)
    return impl("vote_accumulate_")(votes, grads, tau)


def vote_finalize(selection_votes, estimation_votes, n0, n, radius_table, sigma, count_below):
    return impl("vote_finalize")(selection_votes, estimation_votes, n0, n, radius_table, sigma,
                                  count_below)


def fragile_compact(values, radii, threshold):
    if not values and not radii:  # nothing is fragile
        return reference.fragile_compact([], [], threshold)
    return impl("fragile_compact")(values, radii, threshold)


# ---- history codecs (docs/design.md §5) -------------------------------------------------------------

def blockwise_quantize(x, bits, block_size, levels="linear"):
    return impl("blockwise_quantize")(x, bits, block_size, levels)


def blockwise_dequantize_(out, codes, scales, bits, block_size, levels="linear"):
    return impl("blockwise_dequantize_")(out, codes, scales, bits, block_size, levels)


def delta_encode_(target, recon, codes, scales, bits, block_size, levels="linear"):
    return impl("delta_encode_")(target, recon, codes, scales, bits, block_size, levels)


def empty_codes(tensors, bits, block_size):
    """Preallocated (codes, scales) for delta_encode_, sized as blockwise_quantize returns them."""
    return fakes.coded_like(tensors, bits, block_size)


def dequantize_axpy_(y, alpha, codes, scales, bits, block_size, levels="linear"):
    return impl("dequantize_axpy_")(y, alpha, codes, scales, bits, block_size, levels)


def dequantize_dot(codes, scales, v, bits, block_size, levels="linear"):
    return impl("dequantize_dot")(codes, scales, v, bits, block_size, levels)




# ---- selection (docs/design.md §7; the public API is unlearn_ext/selection.py) ---------------------
# Empty lists have no tensor to dispatch on: the wrappers answer with the kernels' checks (the
# fakes') and the reference's (trivial) result, as fragile_compact does.

def select_histogram(scores, mode, seed, offset, base, prefix, prefix_bits, digit_bits):
    if not scores:
        fakes.check_select_common(mode, base)
        fakes.check_histogram_args(prefix, prefix_bits, digit_bits)
        return reference.select_histogram([], mode, seed, offset, base, prefix, prefix_bits, digit_bits)
    return impl("select_histogram")(scores, mode, seed, offset, base, prefix, prefix_bits, digit_bits)


def select_tie_boundary(scores, mode, seed, offset, base, key, needed):
    if not scores:
        fakes.check_select_common(mode, base)
        return reference.select_tie_boundary([], mode, seed, offset, base, key, needed)
    return impl("select_tie_boundary")(scores, mode, seed, offset, base, key, needed)


def select_apply_(params, scores, source, masks, mode, seed, offset, base, threshold, boundary, action, alpha,
                  noise_seed, noise_offset):
    if not params:
        fakes.check_select_common(mode, base)
        fakes.check_selection(threshold, boundary)
        fakes.check_action(action, alpha, len(source), 0)
        fakes.check_apply_lists([], scores, source, masks)
        return reference.select_apply_([], [], [], [], mode, seed, offset, base, threshold, boundary, action,
                                       alpha, noise_seed, noise_offset)
    return impl("select_apply_")(params, scores, source, masks, mode, seed, offset, base, threshold, boundary,
                                 action, alpha, noise_seed, noise_offset)


def select_mask_grad_(grads, scores, mode, seed, offset, base, threshold, boundary):
    if not grads:
        fakes.check_select_common(mode, base)
        fakes.check_selection(threshold, boundary)
        fakes.check_apply_lists([], scores, [], [])
        return reference.select_mask_grad_([], [], mode, seed, offset, base, threshold, boundary)
    return impl("select_mask_grad_")(grads, scores, mode, seed, offset, base, threshold, boundary)


def select_histogram_near(scores, mode, seed, offset, base, k):
    if not scores:
        fakes.check_select_common(mode, base)
        fakes._check(k >= 0, "k must be >= 0, got ", k)
        return reference.select_histogram_near([], mode, seed, offset, base, k)
    return impl("select_histogram_near")(scores, mode, seed, offset, base, k)


def select_apply_bin_(params, scores, source, masks, mode, seed, offset, base, prefix, prefix_bits, needed, action,
                      alpha, noise_seed, noise_offset):
    if not params:
        fakes.check_select_common(mode, base)
        fakes.check_bin_args(prefix, prefix_bits, needed)
        fakes.check_action(action, alpha, len(source), 0)
        fakes.check_apply_lists([], scores, source, masks)
        return reference.select_apply_bin_([], [], [], [], mode, seed, offset, base, prefix, prefix_bits, needed,
                                           action, alpha, noise_seed, noise_offset)
    return impl("select_apply_bin_")(params, scores, source, masks, mode, seed, offset, base, prefix, prefix_bits,
                                     needed, action, alpha, noise_seed, noise_offset)
