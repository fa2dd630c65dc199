"""Pure-PyTorch reference of the smoothing + quantization ops (docs/design.md §4, framework G and D).

Same signatures and results as torch.ops.unlearn_ext.*: codes and Random bits bit for bit; radii
within float rounding; vote counts identical except where a Phi threshold rounds differently
between libm's erfcf and torch's erfc (docs/design.md §3 bounds how often).
Inputs may be fp32, fp16, bf16 (math in fp32, like the kernels) or fp64 (math in fp64).
"""
from __future__ import annotations

import math

import torch

from .rng import philox_words, uniform_from_words

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
RADIUS_SHRINK = 1.0 - 2.0**-22  # see round_radius_down in csrc/include/unlearn/smoothing.h
CHUNK = 1 << 16  # elements per reference Monte-Carlo chunk (bounds memory of the word matrix)


def _math_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_list(grads, name="grads"):
    for i, g in enumerate(grads):
        if g.dtype not in FLOAT_DTYPES + (torch.float64,):
            raise TypeError(f"{name}[{i}] has dtype {g.dtype}; expected float32, float16 or bfloat16")
        if g.dtype != grads[0].dtype:
            raise TypeError(f"all tensors in {name} must share one dtype, but {name}[0] is "
                            f"{grads[0].dtype} and {name}[{i}] is {g.dtype}")


def _offsets(tensors):
    out, total = [], 0
    for t in tensors:
        out.append(total)
        total += t.numel()
    return out


def _stats(radii_flat: torch.Tensor, abstained: int, nonfinite: int, count_below: float, device):
    min_radius = radii_flat.min() if radii_flat.numel() else torch.tensor(float("inf"))
    below = int((radii_flat < count_below).sum()) if radii_flat.numel() else 0
    counts = torch.tensor([abstained, nonfinite, below], dtype=torch.int64, device=device)
    return min_radius.to(torch.float32).to(device).reshape(()), counts


def _round_radius_down(r: torch.Tensor) -> torch.Tensor:
    return r * torch.tensor(RADIUS_SHRINK, dtype=r.dtype)


# ---- analytic ------------------------------------------------------------------------------------

def analytic_decision(v: torch.Tensor, beta: float):
    """Codes (int8) and radii of the threshold quantizer at +-beta: radius = | |v| - beta |."""
    md = _math_dtype(v)
    x = v.to(md)
    b = torch.tensor(beta, dtype=md)
    finite = torch.isfinite(x)
    code = torch.where(x > b, 1, torch.where(x < -b, -1, 0)).to(torch.int8)
    radius = _round_radius_down((x.abs() - b).abs())
    code = torch.where(finite, code, torch.zeros_like(code))
    radius = torch.where(finite, radius, torch.zeros_like(radius)).to(torch.float32)
    return code, radius


def quantize_analytic(grads, beta: float, count_below: float):
    _check_list(grads)
    codes, radii = [], []
    for g in grads:
        c, r = analytic_decision(g, beta)
        codes.append(c)
        radii.append(r)
    flat = torch.cat([r.reshape(-1) for r in radii]) if radii else torch.empty(0)
    nonfinite = sum(int((~torch.isfinite(g)).sum()) for g in grads)
    device = grads[0].device if grads else "cpu"
    return (codes, radii, *_stats(flat, 0, nonfinite, count_below, device))


# ---- Monte-Carlo ---------------------------------------------------------------------------------

def normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Phi(x) = erfc(-x / sqrt 2) / 2, accurate in both tails (same form as the kernels)."""
    return 0.5 * torch.special.erfc(-x * torch.tensor(0.70710678118654752, dtype=x.dtype))


def class_probabilities(v: torch.Tensor, tau: float, sigma: float):
    """(p_neg, p_pos) of 'add sigma * Z, then quantize at +-tau', in the kernels' arithmetic."""
    md = _math_dtype(v)
    x = v.to(md)
    t = torch.tensor(tau, dtype=md)
    inv_sigma = torch.tensor(1.0 / sigma, dtype=md)
    return normal_cdf((-t - x) * inv_sigma), normal_cdf((x - t) * inv_sigma)


def draw_classes(u: torch.Tensor, p_neg: torch.Tensor, p_pos: torch.Tensor) -> torch.Tensor:
    """Class of each draw: -1 if u < p-, +1 if u > 1 - p+, else 0 (u exact float64)."""
    pn = p_neg.to(torch.float64).unsqueeze(-1)
    pp = p_pos.to(torch.float64).unsqueeze(-1)
    neg = u < pn
    pos = (u > 1.0 - pp) & ~neg
    return pos.to(torch.int8) - neg.to(torch.int8)


def select_class(sel_neg, sel_pos, n0):
    """c_A from selection counts; ties prefer 0, then +1, then -1 (same as the kernels)."""
    zero = n0 - sel_neg - sel_pos
    nonzero = torch.where(sel_pos >= sel_neg, 1, -1)
    return torch.where((zero >= sel_pos) & (zero >= sel_neg), 0, nonzero).to(torch.int8)


def certify_from_counts(sel_neg, sel_pos, n0, est_neg, est_pos, n, radius_table, sigma):
    c_a = select_class(sel_neg, sel_pos, n0)
    k_a = torch.where(c_a == 0, n - est_neg - est_pos, torch.where(c_a > 0, est_pos, est_neg))
    k_a = k_a.clamp(0, n).long()
    phi_inv_low = radius_table.to(torch.float32)[k_a]
    ok = phi_inv_low > 0
    radius = _round_radius_down(torch.tensor(sigma, dtype=torch.float32) * phi_inv_low)
    code = torch.where(ok, c_a, torch.zeros_like(c_a)).to(torch.int8)
    radius = torch.where(ok, radius, torch.zeros_like(radius))
    return code, radius, ~ok


def mc_counts(v_flat: torch.Tensor, global_begin: int, tau, sigma, n0, n, seed, offset):
    """Selection and estimation counts (neg, pos) of every element of a flat tensor."""
    p_neg, p_pos = class_probabilities(v_flat, tau, sigma)
    idx = torch.arange(global_begin, global_begin + v_flat.numel(), dtype=torch.int64)
    cls = draw_classes(uniform_from_words(philox_words(idx, n0 + n, seed, offset)), p_neg, p_pos)
    sel, est = cls[:, :n0], cls[:, n0:]
    return ((sel == -1).sum(1), (sel == 1).sum(1), (est == -1).sum(1), (est == 1).sum(1))


def _check_mc(tau, sigma, n0, n, radius_table):
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma}")
    if not (tau >= 0 and math.isfinite(tau)):
        raise ValueError(f"tau must be a finite number >= 0, got {tau}")
    if n0 < 1:
        raise ValueError(f"n0 (selection draws) must be >= 1, got {n0}")
    if n < 1:
        raise ValueError(f"n (estimation draws) must be >= 1, got {n}")
    if radius_table.dim() != 1 or radius_table.numel() != n + 1:
        raise ValueError(f"radius_table must be a 1-D tensor of n + 1 = {n + 1} entries")


def mc_decision(v: torch.Tensor, global_begin: int, tau, sigma, n0, n, radius_table, seed, offset):
    flat = v.reshape(-1)
    codes, radii, abst = [], [], []
    for s in range(0, flat.numel(), CHUNK):
        part = flat[s:s + CHUNK]
        sn, sp, en, ep = mc_counts(part, global_begin + s, tau, sigma, n0, n, seed, offset)
        c, r, a = certify_from_counts(sn, sp, n0, en, ep, n, radius_table, sigma)
        finite = torch.isfinite(part)
        codes.append(torch.where(finite, c, torch.zeros_like(c)))
        radii.append(torch.where(finite, r, torch.zeros_like(r)))
        abst.append(a & finite)
    if not codes:
        return (torch.empty(v.shape, dtype=torch.int8), torch.empty(v.shape, dtype=torch.float32), 0)
    return (torch.cat(codes).reshape(v.shape), torch.cat(radii).reshape(v.shape), int(torch.cat(abst).sum()))


def quantize_mc(grads, tau, sigma, n0, n, radius_table, seed, offset, count_below):
    _check_list(grads)
    _check_mc(tau, sigma, n0, n, radius_table)
    codes, radii, abstained = [], [], 0
    for g, start in zip(grads, _offsets(grads)):
        c, r, a = mc_decision(g.detach().cpu(), start, tau, sigma, n0, n, radius_table.cpu(), seed, offset)
        codes.append(c.to(g.device))
        radii.append(r.to(g.device))
        abstained += a
    flat = torch.cat([r.reshape(-1) for r in radii]) if radii else torch.empty(0)
    nonfinite = sum(int((~torch.isfinite(g)).sum()) for g in grads)
    device = grads[0].device if grads else "cpu"
    return (codes, radii, *_stats(flat, abstained, nonfinite, count_below, device))


# ---- fused steps ---------------------------------------------------------------------------------

def apply_codes_(params, codes, step_size):
    """params <- params - step_size * code (int8 codes in {-1, 0, 1} shaped like params): the
    update of the fused steps, in float32 math (float64 for float64 params), rounded once."""
    if len(params) != len(codes):
        raise ValueError(f"params has {len(params)} tensors but codes has {len(codes)}")
    with torch.no_grad():
        for w, c in zip(params, codes):
            md = _math_dtype(w)
            new = w.to(md) - torch.tensor(step_size, dtype=md) * c.to(device=w.device, dtype=md)
            w.copy_(new.to(w.dtype))


def _step(params, grads, step_size, count_below, check_finite, quantize):
    if len(params) != len(grads):
        raise ValueError(f"params has {len(params)} tensors but grads has {len(grads)}")
    nonfinite = sum(int((~torch.isfinite(g)).sum()) for g in grads)
    if check_finite and nonfinite:
        device = grads[0].device
        return torch.tensor(float("inf"), device=device), torch.tensor([0, nonfinite, 0], device=device)
    codes, _, min_radius, counts = quantize(grads)
    with torch.no_grad():
        apply_codes_(params, codes, step_size)
    return min_radius, counts


def quantized_step_analytic_(params, grads, beta, step_size, count_below, check_finite):
    return _step(params, grads, step_size, count_below, check_finite,
                 lambda g: quantize_analytic(g, beta, count_below))


def quantized_step_mc_(params, grads, tau, sigma, n0, n, radius_table, seed, offset, step_size,
                       count_below, check_finite):
    return _step(params, grads, step_size, count_below, check_finite,
                 lambda g: quantize_mc(g, tau, sigma, n0, n, radius_table, seed, offset, count_below))


# ---- framework D ---------------------------------------------------------------------------------

def vote_accumulate_(votes, grads, tau):
    """Adds one sample's votes: votes[i][0] counts v < -tau, votes[i][1] counts v > tau."""
    _check_list(grads)
    for vt, g in zip(votes, grads):
        x = g.to(_math_dtype(g))
        vt[0] += (x < -tau).to(vt.dtype)
        vt[1] += (x > tau).to(vt.dtype)
    nonfinite = sum(int((~torch.isfinite(g)).sum()) for g in grads)
    return torch.tensor(nonfinite, dtype=torch.int64)


def vote_finalize(selection_votes, estimation_votes, n0, n, radius_table, sigma, count_below):
    _check_mc(0.0, sigma, n0, n, radius_table)
    codes, radii, abstained = [], [], 0
    for s, e in zip(selection_votes, estimation_votes):
        c, r, a = certify_from_counts(s[0].long(), s[1].long(), n0, e[0].long(), e[1].long(), n,
                                      radius_table.cpu(), sigma)
        codes.append(c)
        radii.append(r)
        abstained += int(a.sum())
    flat = torch.cat([r.reshape(-1) for r in radii]) if radii else torch.empty(0)
    device = selection_votes[0].device if selection_votes else "cpu"
    return (codes, radii, *_stats(flat, abstained, 0, count_below, device))
