"""Fake (meta) implementations of every op: output shapes and dtypes only, so the ops trace under
torch.compile and pass torch.library.opcheck. Registered only when the compiled ops exist.

Each fake checks its inputs the way the kernels do (the same conditions, messages that name the
problem), so a bad call fails while tracing instead of at run time, and no fake is more permissive
or stricter than its kernel. Empty lists get the kernels' answer:
  * quantize_mc and the codecs accept them (empty outputs; the dot product is 0);
  * quantize_analytic, vote_accumulate_ and fragile_compact have no tensor to dispatch on; their
    wrappers (ops/__init__.py) answer with empty results on the CPU, and so do the fakes;
  * the fused steps and vote_finalize refuse them (as the kernels do).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..reference.codecs import MAX_BLOCK, MIN_BLOCK, block_count, code_dtype, code_numel
from .loader import _C

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
VOTE_DTYPES = (torch.int16, torch.int32)
# Doubles at or above this magnitude round to inf as float32 (halfway between FLT_MAX and 2^128).
FLOAT32_OVERFLOW = 2.0**128 - 2.0**103


# ---- input checks (mirror csrc/include/unlearn/tensor_list.h and codec_list.h) ------------------

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


# ---- output allocation ----------------------------------------------------------------------------

def _stats_on(device):
    """(min_radius: float32 scalar, counts: int64[3]) on a device."""
    return (torch.empty((), dtype=torch.float32, device=device),
            torch.empty((3,), dtype=torch.int64, device=device))


def _codes_radii_like(shapes, device_of):
    return ([torch.empty(s, dtype=torch.int8, device=d) for s, d in zip(shapes, device_of)],
            [torch.empty(s, dtype=torch.float32, device=d) for s, d in zip(shapes, device_of)])


def _quantize_outputs(grads, stats_device):
    return (*_codes_radii_like([g.shape for g in grads], [g.device for g in grads]), *_stats_on(stats_device))


def coded_like(tensors, bits, block_size):
    """(codes, scales) shaped as blockwise_quantize returns them; sizes from the reference (the one
    Python source of code and scale counts)."""
    codes = [t.new_empty((code_numel(t.numel(), bits),), dtype=code_dtype(bits)) for t in tensors]
    scales = [t.new_empty((block_count(t.numel(), block_size),), dtype=torch.float32) for t in tensors]
    return codes, scales


_CPU = torch.device("cpu")


def _first_device(tensors, default=_CPU):
    return tensors[0].device if tensors else default


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


# ---- registration ---------------------------------------------------------------------------------

if _C is not None:
    def _rng_fake(dtype):
        def fake(element_index, draws, *args):
            _check(element_index.dtype == torch.int64, "element_index must be int64, got ", element_index.dtype)
            _check(draws >= 0, "draws must be >= 0, got ", draws)
            return element_index.new_empty((*element_index.shape, draws), dtype=dtype)
        return fake

    torch.library.register_fake("unlearn_ext::philox_bits")(_rng_fake(torch.int32))
    torch.library.register_fake("unlearn_ext::philox_uniform")(_rng_fake(torch.float64))
    _philox_draws_fake = _rng_fake(torch.bool)

    @torch.library.register_fake("unlearn_ext::philox_bernoulli")
    def _philox_bernoulli_fake(element_index, draws, p, seed, offset):
        out = _philox_draws_fake(element_index, draws)
        _check(0.0 <= p <= 1.0, "p must be in [0, 1], got ", p)
        return out

    @torch.library.register_fake("unlearn_ext::quantize_analytic")
    def _quantize_analytic_fake(grads, beta, count_below):
        check_beta(beta)
        _check_float_list(grads, "grads")
        check_float32(count_below, "count_below", allow_inf=True)
        return _quantize_outputs(grads, _first_device(grads))  # empty list: CPU statistics (the wrapper's)

    @torch.library.register_fake("unlearn_ext::quantize_mc")
    def _quantize_mc_fake(grads, tau, sigma, n0, n, radius_table, seed, offset, count_below):
        _check_float_list(grads, "grads")
        check_tau(tau)
        _check_mc(sigma, n0, n, radius_table, _first_device(grads, radius_table.device))
        check_float32(count_below, "count_below", allow_inf=True)
        # Statistics live where the gradients are; the kernels put those of an empty list on
        # radius_table's device (the CPU kernel on the CPU, which is where its table is).
        return _quantize_outputs(grads, _first_device(grads, radius_table.device))

    @torch.library.register_fake("unlearn_ext::quantized_step_analytic_")
    def _step_analytic_fake(params, grads, beta, step_size, count_below, check_finite):
        check_beta(beta)
        check_step(params, grads, step_size)
        check_float32(count_below, "count_below", allow_inf=True)
        return _stats_on(grads[0].device)

    @torch.library.register_fake("unlearn_ext::apply_codes_")
    def _apply_codes_fake(params, codes, step_size):
        check_float32(step_size, "step_size")
        _check_float_list(params, "params")
        check_paired(params, "params", codes, "codes")
        for i, c in enumerate(codes):
            _check(c.dtype == torch.int8, "codes[", i, "] must be int8 ternary codes, got ", c.dtype)
        return None

    @torch.library.register_fake("unlearn_ext::quantized_step_mc_")
    def _step_mc_fake(params, grads, tau, sigma, n0, n, radius_table, seed, offset, step_size,
                      count_below, check_finite):
        check_step(params, grads, step_size)
        check_tau(tau)
        _check_mc(sigma, n0, n, radius_table, grads[0].device)
        check_float32(count_below, "count_below", allow_inf=True)
        return _stats_on(grads[0].device)

    @torch.library.register_fake("unlearn_ext::vote_accumulate_")
    def _vote_accumulate_fake(votes, grads, tau):
        check_tau(tau)
        _check_float_list(grads, "grads")
        _check_votes(votes, [g.shape for g in grads], [g.device for g in grads], "votes")
        return torch.empty((), dtype=torch.int64, device=_first_device(votes))  # the nonfinite count

    @torch.library.register_fake("unlearn_ext::vote_finalize")
    def _vote_finalize_fake(selection_votes, estimation_votes, n0, n, radius_table, sigma, count_below):
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
        return (*_codes_radii_like(shapes, [s.device for s in selection_votes]),
                *_stats_on(selection_votes[0].device))

    @torch.library.register_fake("unlearn_ext::fragile_compact")
    def _fragile_compact_fake(values, radii, threshold):
        check_paired(values, "values", radii, "radii")
        _check_float_list(values, "values")
        for i, r in enumerate(radii):
            _check(r.dtype == torch.float32, "radii[", i, "] must be float32, got ", r.dtype)
        check_float32(threshold, "threshold", allow_inf=True)
        if not values:  # the wrapper's answer: nothing is fragile
            count = 0
        else:
            count = torch.library.get_ctx().new_dynamic_size()  # how many are fragile is data-dependent
        # The kernels return the compacted coordinates on the values' device.
        device = _first_device(values)
        return (torch.empty((count,), dtype=torch.int64, device=device),
                torch.empty((count,), dtype=torch.float32, device=device),
                torch.empty((count,), dtype=torch.float32, device=device))

    # ---- history codecs: codes and scales are flat, sized from numel and block_size ---------------

    @torch.library.register_fake("unlearn_ext::blockwise_quantize")
    def _blockwise_quantize_fake(x, bits, block_size, levels="linear"):
        _check_codec_args(bits, block_size, levels)
        _check_float_list(x, "x")
        return coded_like(x, bits, block_size)

    @torch.library.register_fake("unlearn_ext::blockwise_dequantize_")
    def _blockwise_dequantize_fake(out, codes, scales, bits, block_size, levels="linear"):
        _codec_inputs(out, "out", codes, scales, bits, block_size, levels)

    @torch.library.register_fake("unlearn_ext::delta_encode_")
    def _delta_encode_fake(target, recon, codes, scales, bits, block_size, levels="linear"):
        _codec_inputs(target, "target", codes, scales, bits, block_size, levels)
        check_paired(target, "target", recon, "recon")
        for i, r in enumerate(recon):
            _check(r.dtype == torch.float32, "recon[", i, "] must be float32 (the reconstruction is kept ",
                   "exactly in fp32), got ", r.dtype)

    @torch.library.register_fake("unlearn_ext::dequantize_axpy_")
    def _dequantize_axpy_fake(y, alpha, codes, scales, bits, block_size, levels="linear"):
        check_float32(alpha, "alpha")
        _codec_inputs(y, "y", codes, scales, bits, block_size, levels)

    @torch.library.register_fake("unlearn_ext::dequantize_dot")
    def _dequantize_dot_fake(codes, scales, v, bits, block_size, levels="linear"):
        _codec_inputs(v, "v", codes, scales, bits, block_size, levels)
        # The CPU kernel (and the empty-list kernel) answer on the CPU, CUDA on the values' device.
        return torch.empty((), dtype=torch.float64, device=_first_device(v))

    # ---- selection (mirror csrc/include/unlearn/select_checks.h) ----------------------------------

    @torch.library.register_fake("unlearn_ext::select_histogram")
    def _select_histogram_fake(scores, key_mode, seed, offset, base, prefix, prefix_bits, digit_bits):
        check_select_common(key_mode, base)
        check_histogram_args(prefix, prefix_bits, digit_bits)
        _check_float_list(scores, "scores")
        return torch.empty(((1 << digit_bits) + 1,), dtype=torch.int64, device=_first_device(scores))

    @torch.library.register_fake("unlearn_ext::select_tie_boundary")
    def _select_tie_boundary_fake(scores, key_mode, seed, offset, base, key, needed):
        check_select_common(key_mode, base)
        _check(needed >= 0, "needed must be >= 0, got ", needed)
        _check_float_list(scores, "scores")
        return torch.empty((), dtype=torch.int64, device=_first_device(scores))

    @torch.library.register_fake("unlearn_ext::select_apply_")
    def _select_apply_fake(params, scores, source, masks, key_mode, seed, offset, base, threshold, boundary, action,
                           alpha, noise_seed, noise_offset):
        check_select_common(key_mode, base)
        check_selection(threshold, boundary)
        check_action(action, alpha, len(source), len(params))
        check_apply_lists(params, params if (key_mode == 2 and not scores) else scores, source, masks)
        return torch.empty((), dtype=torch.int64, device=_first_device(params))

    @torch.library.register_fake("unlearn_ext::select_histogram_near")
    def _select_histogram_near_fake(scores, key_mode, seed, offset, base, k):
        check_select_common(key_mode, base)
        _check(k >= 0, "k must be >= 0, got ", k)
        _check_float_list(scores, "scores")
        return torch.empty(((1 << 16) + 3,), dtype=torch.int64, device=_first_device(scores))

    @torch.library.register_fake("unlearn_ext::select_apply_bin_")
    def _select_apply_bin_fake(params, scores, source, masks, key_mode, seed, offset, base, prefix, prefix_bits,
                               needed, action, alpha, noise_seed, noise_offset):
        check_select_common(key_mode, base)
        check_bin_args(prefix, prefix_bits, needed)
        check_action(action, alpha, len(source), len(params))
        check_apply_lists(params, params if (key_mode == 2 and not scores) else scores, source, masks)
        return torch.empty((3,), dtype=torch.int64, device=_first_device(params))

    @torch.library.register_fake("unlearn_ext::select_mask_grad_")
    def _select_mask_grad_fake(grads, scores, key_mode, seed, offset, base, threshold, boundary):
        check_select_common(key_mode, base)
        check_selection(threshold, boundary)
        check_apply_lists(grads, scores, [], [])
        return torch.empty((), dtype=torch.float64, device=_first_device(grads))
