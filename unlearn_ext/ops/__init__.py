"""The raw ops: one-line wrappers over torch.ops.unlearn_ext.* with the op's own signature. The ops
always exist (registry.py: schemas, the reference as default kernel, fakes); the compiled kernels
serve CPU and CUDA when the extension is built (loader.py). The ops check their own arguments
(op_checks.py and the kernels' checks); the public modules (rng.py, pcmu/smoothing.py,
history/codecs.py) add friendlier Python errors that name the user's argument.
"""
from __future__ import annotations

from .loader import backend, check_device, compiled, cuda_built, impl
from . import fakes, registry  # noqa: F401  (registry defines the ops)

# ---- one-line wrappers ---------------------------------------------------------------------------

def philox_bits(element_index, draws, seed, offset):
    return impl("philox_bits")(element_index, draws, seed, offset)


def philox_uniform(element_index, draws, seed, offset):
    return impl("philox_uniform")(element_index, draws, seed, offset)


def philox_bernoulli(element_index, draws, p, seed, offset):
    return impl("philox_bernoulli")(element_index, draws, p, seed, offset)


def quantize_analytic(grads, beta, count_below):
    return impl("quantize_analytic")(grads, beta, count_below)


def quantize_mc(grads, tau, sigma, n0, n, radius_table, seed, offset, count_below):
    return impl("quantize_mc")(grads, tau, sigma, n0, n, radius_table, seed, offset, count_below)


def quantized_step_analytic_(params, grads, beta, step_size, count_below, check_finite):
    return impl("quantized_step_analytic_")(params, grads, beta, step_size, count_below, check_finite)


def quantized_step_mc_(params, grads, tau, sigma, n0, n, radius_table, seed, offset, step_size,
                       count_below, check_finite):
    return impl("quantized_step_mc_")(params, grads, tau, sigma, n0, n, radius_table, seed, offset,
                                       step_size, count_below, check_finite)


def apply_codes_(params, codes, step_size):
    return impl("apply_codes_")(params, codes, step_size)


def vote_accumulate_(votes, grads, tau):
    return impl("vote_accumulate_")(votes, grads, tau)


def vote_finalize(selection_votes, estimation_votes, n0, n, radius_table, sigma, count_below):
    return impl("vote_finalize")(selection_votes, estimation_votes, n0, n, radius_table, sigma,
                                  count_below)


def fragile_compact(values, radii, threshold):
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

def select_histogram(scores, mode, seed, offset, base, prefix, prefix_bits, digit_bits):
    return impl("select_histogram")(scores, mode, seed, offset, base, prefix, prefix_bits, digit_bits)


def select_tie_boundary(scores, mode, seed, offset, base, key, needed):
    return impl("select_tie_boundary")(scores, mode, seed, offset, base, key, needed)


def select_apply_(params, scores, source, masks, mode, seed, offset, base, threshold, boundary, action, alpha,
                  noise_seed, noise_offset):
    return impl("select_apply_")(params, scores, source, masks, mode, seed, offset, base, threshold, boundary,
                                 action, alpha, noise_seed, noise_offset)


def select_mask_grad_(grads, scores, mode, seed, offset, base, threshold, boundary):
    return impl("select_mask_grad_")(grads, scores, mode, seed, offset, base, threshold, boundary)


def select_histogram_near(scores, mode, seed, offset, base, k):
    return impl("select_histogram_near")(scores, mode, seed, offset, base, k)


def select_apply_bin_(params, scores, source, masks, mode, seed, offset, base, prefix, prefix_bits, needed, action,
                      alpha, noise_seed, noise_offset):
    return impl("select_apply_bin_")(params, scores, source, masks, mode, seed, offset, base, prefix, prefix_bits,
                                     needed, action, alpha, noise_seed, noise_offset)


# ---- DeltaGrad replay steps (mini/layer_chain.py, mini/deltagrad.py) ---------------------------------

def layer_chain_grad_sums_(out, x, y, weights, biases, layers, split):
    return impl("layer_chain_grad_sums_")(out, x, y, weights, biases, layers, split)


def deltagrad_qn_step_(w, buffer, dw, recorded, W, P, sigma, predicted, g_removed, removed_alpha, scale, weight_decay,
                       lr, momentum, nesterov, start_buffer):
    return impl("deltagrad_qn_step_")(w, buffer, dw, recorded, W, P, sigma, predicted, g_removed, removed_alpha, scale,
                                      weight_decay, lr, momentum, nesterov, start_buffer)


def deltagrad_qn_run_(w, buffer, chain_weights, grad, recorded_w, recorded_g, x, y, counts, lrs, scales, removed_alphas,
                      shapes, layers, W, P, sigma, weight_decay, momentum, nesterov, start_buffer):
    return impl("deltagrad_qn_run_")(w, buffer, chain_weights, grad, recorded_w, recorded_g, x, y, counts, lrs, scales,
                                     removed_alphas, shapes, layers, W, P, sigma, weight_decay, momentum, nesterov,
                                     start_buffer)
