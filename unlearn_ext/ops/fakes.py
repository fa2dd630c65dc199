"""Fake (meta) implementations of every op: output shapes and dtypes only, so the ops trace under
torch.compile and pass torch.library.opcheck. ops/registry.py registers each one behind the op's
argument check (op_checks.py, the same check the kernels and the reference make), so a bad call
fails while tracing, with the kernels' message. Empty lists get the kernels' answer: empty outputs
(statistics and scalars on the CPU, where the reference computes them), or the refusal of the ops
that need a tensor (the fused steps, vote_finalize).
"""
from __future__ import annotations

import torch

from ..codec_format import block_count, code_dtype, code_numel


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


# ---- the fakes: outputs only (the checks run before them) -----------------------------------------

def _rng(dtype):
    def fake(element_index, draws, *args):
        return element_index.new_empty((*element_index.shape, draws), dtype=dtype)
    return fake


def _quantize_analytic(grads, beta, count_below):
    return _quantize_outputs(grads, _first_device(grads))


def _quantize_mc(grads, tau, sigma, n0, n, radius_table, seed, offset, count_below):
    # Statistics live where the gradients are; those of an empty list on radius_table's device
    # (the kernel that serves the call is radius_table's).
    return _quantize_outputs(grads, _first_device(grads, radius_table.device))


def _step(params, grads, *args):
    return _stats_on(grads[0].device)


def _nothing(*args):
    return None


def _vote_accumulate(votes, grads, tau):
    return torch.empty((), dtype=torch.int64, device=_first_device(votes))  # the nonfinite count


def _vote_finalize(selection_votes, estimation_votes, n0, n, radius_table, sigma, count_below):
    shapes = [s.shape[1:] for s in selection_votes]
    return (*_codes_radii_like(shapes, [s.device for s in selection_votes]), *_stats_on(selection_votes[0].device))


def _fragile_compact(values, radii, threshold):
    # How many are fragile is data-dependent: an unbacked size (none for an empty list).
    count = torch.library.get_ctx().new_dynamic_size() if values else 0
    device = _first_device(values)
    return (torch.empty((count,), dtype=torch.int64, device=device),
            torch.empty((count,), dtype=torch.float32, device=device),
            torch.empty((count,), dtype=torch.float32, device=device))


def _blockwise_quantize(x, bits, block_size, levels="linear"):
    return coded_like(x, bits, block_size)


def _dequantize_dot(codes, scales, v, bits, block_size, levels="linear"):
    return torch.empty((), dtype=torch.float64, device=_first_device(v))


def _int64_on_first(size):
    def fake(tensors, *args):
        return torch.empty(size, dtype=torch.int64, device=_first_device(tensors))
    return fake


def _select_mask_grad(grads, *args):
    return torch.empty((), dtype=torch.float64, device=_first_device(grads))


FAKES = {
    "philox_bits": _rng(torch.int32),
    "philox_uniform": _rng(torch.float64),
    "philox_bernoulli": _rng(torch.bool),
    "quantize_analytic": _quantize_analytic,
    "quantize_mc": _quantize_mc,
    "quantized_step_analytic_": _step,
    "quantized_step_mc_": _step,
    "apply_codes_": _nothing,
    "vote_accumulate_": _vote_accumulate,
    "vote_finalize": _vote_finalize,
    "fragile_compact": _fragile_compact,
    "blockwise_quantize": _blockwise_quantize,
    "blockwise_dequantize_": _nothing,
    "delta_encode_": _nothing,
    "dequantize_axpy_": _nothing,
    "dequantize_dot": _dequantize_dot,
    "select_histogram": lambda scores, key_mode, seed, offset, base, prefix, prefix_bits, digit_bits: torch.empty(
        ((1 << digit_bits) + 1,), dtype=torch.int64, device=_first_device(scores)),
    "select_tie_boundary": _int64_on_first(()),
    "select_apply_": _int64_on_first(()),
    "select_histogram_near": _int64_on_first(((1 << 16) + 3,)),
    "select_apply_bin_": _int64_on_first((3,)),
    "select_mask_grad_": _select_mask_grad,
    "layer_chain_grad_sums_": _nothing,
    "deltagrad_qn_step_": lambda w, *args: torch.empty((), dtype=torch.float64, device=w.device),
    "deltagrad_qn_run_": lambda w, buffer, chain_weights, grad, recorded_w, recorded_g, x, y, counts, *args: torch.empty(
        (len(counts),), dtype=torch.float64, device=w.device),
}
