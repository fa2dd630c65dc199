"""The one place in Python that checks the arguments of every op: the fakes (torch.compile, meta
tensors) and the reference kernels call the same check before any work, with the conditions and
messages of the C++ kernels' checks (csrc/include/unlearn/*_checks.h, tensor_list.h,
codec_list.h), so a bad call raises the same RuntimeError with the same message on every backend:
compiled CPU/CUDA, the reference, and fake tensors (tests/test_opcheck.py, BAD_INPUTS).

`CHECKS[name](*args)` checks one call of op `name`; `check_written(schema, args)` refuses written
tensors whose elements share memory, for every op at once (from the schema's alias annotations).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch._subclasses.fake_tensor import is_fake

from ..reference.codecs import MAX_BLOCK, MIN_BLOCK, block_count, code_dtype, code_numel
from .schemas import MAX_DRAWS

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
VOTE_DTYPES = (torch.int16, torch.int32)
# Doubles at or above this magnitude round to inf as float32 (halfway between FLT_MAX and 2^128).
FLOAT32_OVERFLOW = 2.0**128 - 2.0**103
_OVERLAP_YES = 1  # torch._debug_has_internal_overlap: 0 no, 1 yes, 2 too hard to tell (accepted, as torch does)


# ---- shared conditions (mirror csrc/include/unlearn/tensor_list.h and codec_list.h) --------------

def _check(cond, *msg) -> None:
    torch._check(cond, lambda: "unlearn_ext: " + "".join(str(m) for m in msg))


def check_float32(x: float, name: str, allow_inf: bool = False) -> None:
    """The kernels use float arguments as float32: refuse NaN and finite values that round to inf."""
    ok = not math.isnan(x) and (abs(x) < FLOAT32_OVERFLOW or (allow_inf and math.isinf(x)))
    _check(ok, name, " must be a float32 number or +-inf" if allow_inf else
           " must be finite as float32 (|x| <= 3.4028235e38)", ", got ", x)


def _check_one_device(tensors, name: str) -> None:
    """One device per list: a list mixing CPU and meta tensors would otherwise reach this fake (meta
    wins the dispatch) and leave the CPU tensors untouched."""
    for i, t in enumerate(tensors):
        _check(t.device == tensors[0].device, "all tensors in ", name, " must be on one device, but ", name,
               "[0] is on ", tensors[0].device, " and ", name, "[", i, "] is on ", t.device)


def _check_on_device(named, device) -> None:
    """Every (name, tensor or None) of `named` on `device`: a call mixing CPU and meta tensors would
    otherwise reach the fake (meta wins the dispatch) and leave the CPU tensors untouched, and one
    mixing CPU and CUDA tensors would reach the reference and fail part way. (A compiled CPU kernel
    never sees such a call, so its checks need no such condition.)"""
    for name, t in named:
        _check(t is None or t.device == device, name, " is on ", None if t is None else t.device, " but ", named[0][0],
               " is on ", device)


def _check_float_list(tensors, name: str) -> None:
    """fp32/fp16/bf16, one dtype and one device for the whole list."""
    for i, t in enumerate(tensors):
        _check(t.dtype in FLOAT_DTYPES, name, "[", i, "] has dtype ", t.dtype,
               "; expected float32, float16 or bfloat16")
        _check(t.dtype == tensors[0].dtype, "all tensors in ", name, " must share one dtype, but ", name,
               "[0] is ", tensors[0].dtype, " and ", name, "[", i, "] is ", t.dtype)
    _check_one_device(tensors, name)


def check_paired(a, a_name: str, b, b_name: str) -> None:
    """Same number of tensors, same shape pairwise."""
    _check(len(a) == len(b), a_name, " has ", len(a), " tensors but ", b_name, " has ", len(b))
    for i, (x, y) in enumerate(zip(a, b)):
        _check(x.shape == y.shape, a_name, "[", i, "] has shape ", tuple(x.shape), " but ", b_name, "[", i,
               "] has shape ", tuple(y.shape))
        _check(x.device == y.device, a_name, "[", i, "] is on ", x.device, " but ", b_name, "[", i, "] is on ",
               y.device)


def _check_not_empty(tensors, what: str) -> None:
    _check(len(tensors) > 0, what)


def check_tau(tau: float) -> None:
    check_float32(tau, "tau")
    _check(tau >= 0, "tau must be a finite number >= 0, got ", tau)


def check_beta(beta: float) -> None:
    check_float32(beta, "beta")
    _check(beta >= 0, "beta must be finite and >= 0, got ", beta)


def _check_mc(sigma: float, n0: int, n: int, radius_table: torch.Tensor, device) -> None:
    check_float32(sigma, "sigma")
    _check(float(np.float32(sigma)) > 0, "sigma must be a finite number > 0, got ", sigma)
    _check(n0 >= 1, "n0 (selection draws) must be >= 1, got ", n0)
    _check(n >= 1, "n (estimation draws) must be >= 1, got ", n)
    _check(n0 + n <= 1 << 30, "n0 + n is too large (", n0 + n, ")")
    _check(radius_table.dim() == 1 and radius_table.numel() == n + 1, "radius_table must be a 1-D tensor of ",
           "n + 1 = ", n + 1, " entries (one per possible count), got shape ", tuple(radius_table.shape))
    _check(radius_table.dtype == torch.float32, "radius_table must be float32, got ", radius_table.dtype)
    _check(radius_table.device == device, "radius_table is on ", radius_table.device, " but the gradients are on ",
           device)


def check_step(params, grads, step_size: float) -> None:
    _check_float_list(grads, "grads")
    _check_not_empty(grads, "the step needs at least one tensor")
    check_float32(step_size, "step_size")
    check_paired(params, "params", grads, "grads")
    for i, (p, g) in enumerate(zip(params, grads)):
        _check(p.dtype == g.dtype, "params[", i, "] has dtype ", p.dtype, " but grads[", i, "] has ", g.dtype,
               "; they must match")


def _check_votes(votes, shapes, devices, name: str) -> None:
    """int16/int32 counters of shape (2, *shapes[i]), contiguous, one dtype per list."""
    _check(len(votes) == len(shapes), name, " has ", len(votes), " tensors but grads has ", len(shapes))
    for i, (v, shape) in enumerate(zip(votes, shapes)):
        _check(v.dtype in VOTE_DTYPES, name, "[", i, "] must be int16 or int32 counts, got ", v.dtype)
        _check(v.dtype == votes[0].dtype, "all tensors in ", name, " must share one dtype")
        _check(v.shape == (2, *shape), name, "[", i, "] must have shape (2, *grads[", i, "].shape) = ",
               (2, *shape), " (counts of -1 and +1 votes), got ", tuple(v.shape))
        _check(v.is_contiguous(), name, "[", i, "] must be contiguous")
        _check(v.device == devices[i], name, "[", i, "] is on ", v.device, " but grads[", i, "] is on ", devices[i])


def _check_codec_args(bits: int, block_size: int, levels: str = "linear") -> None:
    _check(bits in (8, 4), "bits must be 8 (int8 codes) or 4 (int4 codes), got ", bits)
    _check(MIN_BLOCK <= block_size <= MAX_BLOCK and block_size % 2 == 0, "block_size must be an even number in [",
           MIN_BLOCK, ", ", MAX_BLOCK, "], got ", block_size)
    _check(levels in ("linear", "normal", "companded"),
           "levels must be 'linear', 'normal' (4-bit) or 'companded' (8-bit), got '", levels, "'")
    _check(levels != "normal" or bits == 4, "levels 'normal' is a 4-bit codebook, got bits ", bits)
    _check(levels != "companded" or bits == 8, "levels 'companded' is an 8-bit codebook, got bits ", bits)


def _check_coded(codes, scales, like, like_name: str, bits: int, block_size: int) -> None:
    """codes and scales sized for `like` (one pair per tensor, matching numel per block_size)."""
    _check(len(codes) == len(like), "codes has ", len(codes), " tensors but ", like_name, " has ", len(like))
    _check(len(scales) == len(like), "scales has ", len(scales), " tensors but ", like_name, " has ", len(like))
    for i, (c, s, t) in enumerate(zip(codes, scales, like)):
        _check(c.dtype == code_dtype(bits), "codes[", i, "] has dtype ", c.dtype, "; ", bits, "-bit codes are ",
               code_dtype(bits))
        _check(c.numel() == code_numel(t.numel(), bits), "codes[", i, "] has ", c.numel(), " entries but ",
               like_name, "[", i, "] (", t.numel(), " elements) needs ", code_numel(t.numel(), bits), " for ",
               bits, "-bit codes")
        _check(s.dtype == torch.float32, "scales[", i, "] must be float32, got ", s.dtype)
        _check(c.device == t.device and s.device == t.device, "codes[", i, "] and scales[", i, "] must be on ",
               t.device, " like ", like_name, "[", i, "]")
        _check(s.numel() == block_count(t.numel(), block_size), "scales[", i, "] has ", s.numel(),
               " entries but ", like_name, "[", i, "] (", t.numel(), " elements) has ",
               block_count(t.numel(), block_size), " blocks of ", block_size,
               " (codes and scales must come from the same block_size)")


def _codec_inputs(values, name, codes, scales, bits, block_size, levels="linear") -> None:
    _check_codec_args(bits, block_size, levels)
    _check_float_list(values, name)
    _check_coded(codes, scales, values, name, bits, block_size)


# ---- selection checks (mirror csrc/include/unlearn/select_checks.h) ------------------------------

def check_select_common(mode: int, base: int) -> None:
    _check(mode in (0, 1, 2), "key mode must be 0 (value), 1 (abs) or 2 (random), got ", mode)
    _check(base >= 0, "base (the global index of the list's first element) must be >= 0, got ", base)


def check_selection(threshold: int, boundary: int) -> None:
    _check(-1 <= threshold <= 1 << 32, "threshold must be in [-1, 2^32], got ", threshold)
    _check(boundary >= 0, "boundary must be >= 0, got ", boundary)


def check_histogram_args(prefix: int, prefix_bits: int, digit_bits: int) -> None:
    _check(1 <= digit_bits <= 16, "digit_bits must be in [1, 16], got ", digit_bits)
    _check(prefix_bits >= 0 and prefix_bits + digit_bits <= 32,
           "prefix_bits must be >= 0 with prefix_bits + digit_bits <= 32, got ", prefix_bits, " and ", digit_bits)
    _check(0 <= prefix < (1 << prefix_bits), "prefix must be in [0, 2^prefix_bits), got ", prefix)


def check_bin_args(prefix: int, prefix_bits: int, needed: int) -> None:
    _check(1 <= prefix_bits <= 32, "prefix_bits must be in [1, 32], got ", prefix_bits)
    _check(0 <= prefix < (1 << prefix_bits), "prefix must be in [0, 2^prefix_bits), got ", prefix)
    _check(needed >= 0, "needed must be >= 0, got ", needed)


def check_action(action: int, alpha: float, sources: int, params: int) -> None:
    _check(action in (0, 1, 2, 3), "action must be 0 (set), 1 (scale), 2 (noise) or 3 (axpy), got ", action)
    _check(math.isfinite(alpha), "alpha must be finite, got ", alpha)
    _check(action != 3 or sources == params, "action axpy needs a source tensor per param")
    _check(sources == 0 or sources == params, "source has ", sources, " tensors but params has ", params,
           " (give one per param, or none)")


def check_apply_lists(params, scores, source, masks) -> None:
    _check_float_list(params, "params")
    _check_float_list(scores, "scores")
    check_paired(params, "params", scores, "scores")
    if source:
        check_paired(params, "params", source, "source")
        for i, (s, p) in enumerate(zip(source, params)):
            _check(s.dtype == p.dtype, "source[", i, "] has dtype ", s.dtype, " but params[", i, "] has ", p.dtype)
    if masks:
        check_paired(params, "params", masks, "masks")
        for i, m in enumerate(masks):
            _check(m.dtype == torch.bool, "masks[", i, "] must be bool, got ", m.dtype)
            _check(m.is_contiguous(), "masks[", i, "] must be contiguous")


# ---- written tensors ------------------------------------------------------------------------------

def written_tensors(schema: torch._C.FunctionSchema, args) -> list[torch.Tensor]:
    """The tensors of the arguments the schema marks as written (Tensor(a!) / Tensor(a!)[])."""
    out = []
    for arg, value in zip(schema.arguments, args):
        if arg.alias_info is not None and arg.alias_info.is_write:
            out += [value] if isinstance(value, torch.Tensor) else [] if value is None else list(value)
    return out


def check_written(schema: torch._C.FunctionSchema, args) -> None:
    """No written tensor may have elements that share memory: they would be written more than once,
    in an order that depends on threads. Same message as csrc/ops.cpp."""
    op = schema.name.split("::")[-1]
    for t in written_tensors(schema, args):
        _check(torch._debug_has_internal_overlap(t) != _OVERLAP_YES, op, " writes a tensor whose elements ",
               "share memory (e.g. an as_strided or expand view); clone() it first")


# ---- one check per op (the order of the conditions follows the kernels) ---------------------------

def _check_rng(element_index, draws) -> None:
    _check(element_index.dtype == torch.int64, "element_index must be int64, got ", element_index.dtype)
    _check(0 <= draws <= MAX_DRAWS, "draws must be in [0, ", MAX_DRAWS, "] (words per element index in one call; ",
           "draw more with further calls at a later offset), got ", draws)


def _philox(element_index, draws, seed, offset) -> None:
    _check_rng(element_index, draws)


def _philox_bernoulli(element_index, draws, p, seed, offset) -> None:
    _check_rng(element_index, draws)
    _check(0.0 <= p <= 1.0, "p must be in [0, 1], got ", p)


def _quantize_analytic(grads, beta, count_below) -> None:
    check_beta(beta)
    _check_float_list(grads, "grads")
    check_float32(count_below, "count_below", allow_inf=True)


def _quantize_mc(grads, tau, sigma, n0, n, radius_table, seed, offset, count_below) -> None:
    _check_float_list(grads, "grads")
    check_tau(tau)
    _check_mc(sigma, n0, n, radius_table, grads[0].device if grads else radius_table.device)
    check_float32(count_below, "count_below", allow_inf=True)


def _step_analytic(params, grads, beta, step_size, count_below, check_finite) -> None:
    check_beta(beta)
    check_step(params, grads, step_size)
    check_float32(count_below, "count_below", allow_inf=True)


def _step_mc(params, grads, tau, sigma, n0, n, radius_table, seed, offset, step_size, count_below,
             check_finite) -> None:
    check_step(params, grads, step_size)
    check_tau(tau)
    _check_mc(sigma, n0, n, radius_table, grads[0].device)
    check_float32(count_below, "count_below", allow_inf=True)


def _apply_codes(params, codes, step_size) -> None:
    check_float32(step_size, "step_size")
    _check_float_list(params, "params")
    check_paired(params, "params", codes, "codes")
    for i, c in enumerate(codes):
        _check(c.dtype == torch.int8, "codes[", i, "] must be int8 ternary codes, got ", c.dtype)


def _vote_accumulate(votes, grads, tau) -> None:
    check_tau(tau)
    _check_float_list(grads, "grads")
    _check_votes(votes, [g.shape for g in grads], [g.device for g in grads], "votes")


def _vote_finalize(selection_votes, estimation_votes, n0, n, radius_table, sigma, count_below) -> None:
    _check(len(selection_votes) == len(estimation_votes), "selection_votes has ", len(selection_votes),
           " tensors but estimation_votes has ", len(estimation_votes))
    _check_not_empty(selection_votes, "vote_finalize needs at least one tensor")
    for i, s in enumerate(selection_votes):
        _check(s.dim() >= 1 and s.shape[0] == 2, "selection_votes[", i, "] must have shape (2, ...), got ",
               tuple(s.shape))
    shapes = [s.shape[1:] for s in selection_votes]
    devices = [s.device for s in selection_votes]
    _check_votes(selection_votes, shapes, devices, "selection_votes")
    _check_votes(estimation_votes, shapes, devices, "estimation_votes")
    _check_one_device(selection_votes, "selection_votes")
    _check_mc(sigma, n0, n, radius_table, devices[0])
    check_float32(count_below, "count_below", allow_inf=True)


def _fragile_compact(values, radii, threshold) -> None:
    check_paired(values, "values", radii, "radii")
    _check_float_list(values, "values")
    for i, r in enumerate(radii):
        _check(r.dtype == torch.float32, "radii[", i, "] must be float32, got ", r.dtype)
    check_float32(threshold, "threshold", allow_inf=True)


def _blockwise_quantize(x, bits, block_size, levels="linear") -> None:
    _check_codec_args(bits, block_size, levels)
    _check_float_list(x, "x")


def _blockwise_dequantize(out, codes, scales, bits, block_size, levels="linear") -> None:
    _codec_inputs(out, "out", codes, scales, bits, block_size, levels)


def _delta_encode(target, recon, codes, scales, bits, block_size, levels="linear") -> None:
    _codec_inputs(target, "target", codes, scales, bits, block_size, levels)
    check_paired(target, "target", recon, "recon")
    for i, r in enumerate(recon):
        _check(r.dtype == torch.float32, "recon[", i, "] must be float32 (the reconstruction is kept ",
               "exactly in fp32), got ", r.dtype)


def _dequantize_axpy(y, alpha, codes, scales, bits, block_size, levels="linear") -> None:
    check_float32(alpha, "alpha")
    _codec_inputs(y, "y", codes, scales, bits, block_size, levels)


def _dequantize_dot(codes, scales, v, bits, block_size, levels="linear") -> None:
    _codec_inputs(v, "v", codes, scales, bits, block_size, levels)


def _select_histogram(scores, key_mode, seed, offset, base, prefix, prefix_bits, digit_bits) -> None:
    check_select_common(key_mode, base)
    check_histogram_args(prefix, prefix_bits, digit_bits)
    _check_float_list(scores, "scores")


def _select_tie_boundary(scores, key_mode, seed, offset, base, key, needed) -> None:
    check_select_common(key_mode, base)
    _check(needed >= 0, "needed must be >= 0, got ", needed)
    _check_float_list(scores, "scores")


def _select_apply(params, scores, source, masks, key_mode, seed, offset, base, threshold, boundary, action,
                  alpha, noise_seed, noise_offset) -> None:
    check_select_common(key_mode, base)
    check_selection(threshold, boundary)
    check_action(action, alpha, len(source), len(params))
    check_apply_lists(params, params if (key_mode == 2 and not scores) else scores, source, masks)


def _select_histogram_near(scores, key_mode, seed, offset, base, k) -> None:
    check_select_common(key_mode, base)
    _check(k >= 0, "k must be >= 0, got ", k)
    _check_float_list(scores, "scores")


def _select_apply_bin(params, scores, source, masks, key_mode, seed, offset, base, prefix, prefix_bits, needed,
                      action, alpha, noise_seed, noise_offset) -> None:
    check_select_common(key_mode, base)
    check_bin_args(prefix, prefix_bits, needed)
    check_action(action, alpha, len(source), len(params))
    check_apply_lists(params, params if (key_mode == 2 and not scores) else scores, source, masks)


def _select_mask_grad(grads, scores, key_mode, seed, offset, base, threshold, boundary) -> None:
    check_select_common(key_mode, base)
    check_selection(threshold, boundary)
    check_apply_lists(grads, scores, [], [])


def _layer_chain_grad_sums(out, x, y, weights, biases, layers, split) -> None:
    """As check_chain in csrc/cpu/replay_cpu.cpp (the same conditions, in its order), and one
    device for every tensor (_check_on_device)."""
    _check(len(weights) > 0, "weights must hold at least one tensor")
    for i, code in enumerate(layers):
        _check(0 <= code <= 3, "layers[", i, "] must be 0 (linear), 1 (tanh), 2 (sigmoid) or 3 (relu), got ", code)
    _check(len(layers) > 0 and layers[-1] == 0, "the last layer must be linear (0)")
    linears = sum(code == 0 for code in layers)
    _check(linears == len(weights), "layers name ", linears, " linear layers but weights has ", len(weights),
           " tensors")
    _check(len(biases) == len(weights), "biases has ", len(biases), " entries but weights has ", len(weights))
    dtype = weights[0].dtype
    _check(dtype in (torch.float32, torch.float64), "weights must be float32 or float64, got ", dtype)
    width, total = weights[0].shape[1] if weights[0].dim() == 2 else -1, 0
    for i, (w, b) in enumerate(zip(weights, biases)):
        _check(w.dim() == 2 and w.shape[1] == width, "weights[", i, "] must be 2-D with ", width,
               " columns (the width below it), got shape ", tuple(w.shape))
        _check(w.dtype == dtype, "weights[", i, "] has dtype ", w.dtype, " but weights[0] has ", dtype)
        total += w.numel()
        if b is not None:
            _check(b.dim() == 1 and b.shape[0] == w.shape[0], "biases[", i, "] must have shape (", w.shape[0],
                   ",), got ", tuple(b.shape))
            _check(b.dtype == dtype, "biases[", i, "] has dtype ", b.dtype, " but weights[0] has ", dtype)
            total += b.numel()
        width = w.shape[0]
    _check(x.dtype == dtype, "x has dtype ", x.dtype, " but the weights have ", dtype)
    _check(x.dim() >= 2 and x.shape[1:].numel() == weights[0].shape[1], "x must have rows of ", weights[0].shape[1],
           " values (the first weight's columns), got shape ", tuple(x.shape))
    _check(y.dtype == torch.int64 and y.dim() == 1, "y must be 1-D int64 class indices, got ", y.dtype, " of shape ",
           tuple(y.shape))
    _check(y.shape[0] == x.shape[0], "x has ", x.shape[0], " rows but y has ", y.shape[0])
    _check(x.shape[0] > 0, "x has no rows")
    _check(split == -1 or 0 <= split <= x.shape[0], "split must be -1 (none) or in [0, ", x.shape[0], "], got ", split)
    _check(len(out) == (1 if split == -1 else 2), "out must hold ", 1 if split == -1 else 2, " tensors (split ",
           split, "), got ", len(out))
    for i, o in enumerate(out):
        _check(o.dim() == 1 and o.numel() == total and o.is_contiguous() and o.dtype == dtype, "out[", i,
               "] must be a contiguous 1-D tensor of ", total, " values of the weights' dtype, got ", o.dtype,
               " of shape ", tuple(o.shape))
    _check_on_device([("x", x), ("y", y)] + [(f"weights[{i}]", w) for i, w in enumerate(weights)]
                     + [(f"biases[{i}]", b) for i, b in enumerate(biases)]
                     + [(f"out[{i}]", o) for i, o in enumerate(out)], x.device)
    if y.device.type != "meta" and not is_fake(y):  # (the values: fake and meta tensors have none)
        classes = weights[-1].shape[0]
        bad = y[(y < 0) | (y >= classes)]
        _check(bad.numel() == 0, "y must hold class indices in [0, ", classes, "), got ",
               int(bad[0]) if bad.numel() else None)


def _check_vector(t, name: str, dtype, d: int) -> None:
    _check(t.dtype == dtype and t.dim() == 1 and t.shape[0] == d, name, " must be a 1-D ",
           "float32" if dtype == torch.float32 else "float64", " tensor of ", d, " values, got ", t.dtype, " of shape ",
           tuple(t.shape))


def _deltagrad_qn_step(w, buffer, dw, recorded, W, P, sigma, predicted, g_removed, removed_alpha, scale, weight_decay,
                       lr, momentum, nesterov, start_buffer) -> None:
    """As deltagrad_qn_step_cpu in csrc/cpu/replay_cpu.cpp (the same conditions, in its order), and one
    device for every tensor (_check_on_device)."""
    _check(w.dtype == torch.float32 and w.dim() == 1, "w must be a 1-D float32 tensor, got ", w.dtype, " of shape ",
           tuple(w.shape))
    d = w.shape[0]
    _check_vector(dw, "dw", torch.float32, d)
    _check_vector(recorded, "recorded", torch.float32, d)
    if predicted is not None:
        _check_vector(predicted, "predicted", torch.float64, d)
    else:
        _check(W.dtype == torch.float64 and W.dim() == 2 and W.shape[0] == d, "W must be a 2-D float64 tensor with ",
               d, " rows, got ", W.dtype, " of shape ", tuple(W.shape))
        _check(P.dtype == torch.float64 and P.dim() == 2 and tuple(P.shape) == (W.shape[1], d),
               "P must be a float64 tensor of shape (", W.shape[1], ", ", d, "), got ", P.dtype, " of shape ",
               tuple(P.shape))
    if g_removed is not None:
        _check_vector(g_removed, "g_removed", torch.float32, d)
    if buffer is not None:
        _check_vector(buffer, "buffer", torch.float32, d)
    for name, value in (("sigma", sigma), ("removed_alpha", removed_alpha), ("scale", scale),
                        ("weight_decay", weight_decay), ("lr", lr), ("momentum", momentum)):
        _check(math.isfinite(value), name, " must be finite, got ", value)
    _check_on_device([("w", w), ("buffer", buffer), ("dw", dw), ("recorded", recorded), ("predicted", predicted),
                      ("g_removed", g_removed)] + ([] if predicted is not None else [("W", W), ("P", P)]), w.device)


def _deltagrad_qn_run(w, buffer, chain_weights, grad, recorded_w, recorded_g, x, y, counts, lrs, scales,
                      removed_alphas, shapes, layers, W, P, sigma, weight_decay, momentum, nesterov,
                      start_buffer) -> None:
    """As check_run in csrc/cpu/replay_cpu.cpp (the same conditions, in its order), and one device for
    every tensor (_check_on_device)."""
    _check(w.dtype == torch.float32 and w.dim() == 1, "w must be a 1-D float32 tensor, got ", w.dtype, " of shape ",
           tuple(w.shape))
    d = w.shape[0]
    if buffer is not None:
        _check_vector(buffer, "buffer", torch.float32, d)
    for name, t in (("chain_weights", chain_weights), ("grad", grad)):
        _check(t.dtype == torch.float32 and t.dim() == 1 and t.shape[0] == d and t.is_contiguous(), name,
               " must be a contiguous 1-D float32 tensor of ", d, " values, got ", t.dtype, " of shape ",
               tuple(t.shape))
    n = len(counts)
    for name, values in (("recorded_w", recorded_w), ("recorded_g", recorded_g), ("lrs", lrs), ("scales", scales),
                         ("removed_alphas", removed_alphas)):
        _check(len(values) == n, name, " has ", len(values), " entries but counts has ", n)
    for i in range(n):
        _check_vector(recorded_w[i], f"recorded_w[{i}]", torch.float32, d)
        _check_vector(recorded_g[i], f"recorded_g[{i}]", torch.float32, d)
    for i, code in enumerate(layers):
        _check(0 <= code <= 3, "layers[", i, "] must be 0 (linear), 1 (tanh), 2 (sigmoid) or 3 (relu), got ", code)
    _check(len(layers) > 0 and layers[-1] == 0, "the last layer must be linear (0)")
    linears = sum(code == 0 for code in layers)
    _check(len(shapes) == 3 * linears, "shapes must hold (out, in, bias) for each of the ", linears,
           " linear layers, got ", len(shapes), " values")
    total = 0
    for k in range(linears):
        out, inp, bias = shapes[3 * k:3 * k + 3]
        _check(out > 0 and inp > 0 and bias in (0, 1), "linear layer ", k, " must have out > 0, in > 0 and bias 0 or "
               "1, got (", out, ", ", inp, ", ", bias, ")")
        _check(k == 0 or inp == shapes[3 * k - 3], "linear layer ", k, " takes ", inp, " values but the layer below "
               "gives ", shapes[3 * k - 3] if k else None)
        total += out * inp + bias * out
    _check(total == d, "the layers hold ", total, " parameters but w has ", d)
    for i, count in enumerate(counts):
        _check(count >= 0, "counts[", i, "] must be >= 0, got ", count)
    with_rows = sum(count > 0 for count in counts)
    _check(len(x) == with_rows and len(y) == with_rows, "x and y must hold one entry per step with rows (", with_rows,
           "), got ", len(x), " and ", len(y))
    classes = shapes[3 * linears - 3]
    k = 0
    for i, count in enumerate(counts):
        if count == 0:
            continue
        xk, yk = x[k], y[k]
        _check(xk.dtype == torch.float32 and xk.dim() >= 2 and xk.shape[1:].numel() == shapes[1]
               and xk.shape[0] == count, "x[", k, "] must be float32 with ", count, " rows (counts[", i, "]) of ",
               shapes[1], " values, got ", xk.dtype, " of shape ", tuple(xk.shape))
        _check(yk.dtype == torch.int64 and yk.dim() == 1 and yk.shape[0] == count, "y[", k,
               "] must be 1-D int64 class indices, one per row of x[", k, "], got ", yk.dtype, " of shape ",
               tuple(yk.shape))
        if yk.device.type != "meta" and not is_fake(yk):  # (the values: fake and meta tensors have none)
            bad = yk[(yk < 0) | (yk >= classes)]
            _check(bad.numel() == 0, "y[", k, "] must hold class indices in [0, ", classes, "), got ",
                   int(bad[0]) if bad.numel() else None)
        k += 1
    _check(W.dtype == torch.float64 and W.dim() == 2 and W.shape[0] == d, "W must be a 2-D float64 tensor with ", d,
           " rows, got ", W.dtype, " of shape ", tuple(W.shape))
    _check(P.dtype == torch.float64 and P.dim() == 2 and tuple(P.shape) == (W.shape[1], d),
           "P must be a float64 tensor of shape (", W.shape[1], ", ", d, "), got ", P.dtype, " of shape ",
           tuple(P.shape))
    for name, value in (("sigma", sigma), ("weight_decay", weight_decay), ("momentum", momentum)):
        _check(math.isfinite(value), name, " must be finite, got ", value)
    for i, values in enumerate(zip(lrs, scales, removed_alphas)):
        _check(all(math.isfinite(v) for v in values), "lrs, scales and removed_alphas must be finite, got ",
               ", ".join(str(v) for v in values), " at step ", i)
    _check_on_device([("w", w), ("buffer", buffer), ("chain_weights", chain_weights), ("grad", grad), ("W", W),
                      ("P", P)] + [(f"recorded_w[{i}]", t) for i, t in enumerate(recorded_w)]
                     + [(f"recorded_g[{i}]", t) for i, t in enumerate(recorded_g)]
                     + [(f"x[{i}]", t) for i, t in enumerate(x)] + [(f"y[{i}]", t) for i, t in enumerate(y)], w.device)


CHECKS = {
    "philox_bits": _philox,
    "philox_uniform": _philox,
    "philox_bernoulli": _philox_bernoulli,
    "quantize_analytic": _quantize_analytic,
    "quantize_mc": _quantize_mc,
    "quantized_step_analytic_": _step_analytic,
    "quantized_step_mc_": _step_mc,
    "apply_codes_": _apply_codes,
    "vote_accumulate_": _vote_accumulate,
    "vote_finalize": _vote_finalize,
    "fragile_compact": _fragile_compact,
    "blockwise_quantize": _blockwise_quantize,
    "blockwise_dequantize_": _blockwise_dequantize,
    "delta_encode_": _delta_encode,
    "dequantize_axpy_": _dequantize_axpy,
    "dequantize_dot": _dequantize_dot,
    "select_histogram": _select_histogram,
    "select_tie_boundary": _select_tie_boundary,
    "select_apply_": _select_apply,
    "select_histogram_near": _select_histogram_near,
    "select_apply_bin_": _select_apply_bin,
    "select_mask_grad_": _select_mask_grad,
    "layer_chain_grad_sums_": _layer_chain_grad_sums,
    "deltagrad_qn_step_": _deltagrad_qn_step,
    "deltagrad_qn_run_": _deltagrad_qn_run,
}
