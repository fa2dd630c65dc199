"""Pure-PyTorch reference of the selection family (docs/design.md §7, our formulation; the contract
is in unlearn_ext/ops/schemas.py and csrc/include/unlearn/select.h).

Keys are uint32 values held in int64 tensors. The reference may concatenate (it is the truth, not
the fast path); the kernels never do.
"""
from __future__ import annotations

import math

import torch

from ..radix import bin_selection
from .rng import MASK32, philox_words
from .smoothing import FLOAT_DTYPES

KEY_VALUE, KEY_ABS, KEY_RANDOM = 0, 1, 2
ACT_SET, ACT_SCALE, ACT_NOISE, ACT_AXPY = 0, 1, 2, 3
SIGN = 0x80000000


def _check_list(tensors, name):
    for i, t in enumerate(tensors):
        if t.dtype not in FLOAT_DTYPES or t.dtype != tensors[0].dtype:
            raise TypeError(f"{name}[{i}] has dtype {t.dtype}; expected one of float32, float16, bfloat16 "
                            "shared by the whole list")


def _check_mode(mode):
    if mode not in (KEY_VALUE, KEY_ABS, KEY_RANDOM):
        raise ValueError(f"key mode must be 0 (value), 1 (abs) or 2 (random), got {mode}")


def order_key(v: torch.Tensor) -> torch.Tensor:
    """Order-preserving uint32 key (int64 tensor) of float32 values; -0.0 ranks with +0.0."""
    b = v.to(torch.float32).contiguous().view(torch.int32).to(torch.int64) & MASK32
    b = torch.where(b == SIGN, torch.zeros_like(b), b)
    return torch.where(b >= SIGN, (~b) & MASK32, b | SIGN)


def keys_of(scores, mode: int, seed: int, offset: int, base: int):
    """(keys, nan) of the whole list read as one vector (int64 keys, bool NaN flags)."""
    _check_mode(mode)
    _check_list(scores, "scores")
    n = sum(s.numel() for s in scores)
    device = scores[0].device if scores else torch.device("cpu")
    if mode == KEY_RANDOM:
        idx = torch.arange(base, base + n, dtype=torch.int64, device=device)
        w = philox_words(idx, 1, seed, offset).reshape(-1)
        return (~w) & MASK32, torch.zeros(n, dtype=torch.bool, device=device)
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=device), torch.zeros(0, dtype=torch.bool, device=device)
    v = torch.cat([s.reshape(-1).to(torch.float32) for s in scores])
    if mode == KEY_ABS:
        v = v.abs()
    return order_key(v), torch.isnan(v)


def select_histogram(scores, mode: int, seed: int, offset: int, base: int, prefix: int, prefix_bits: int,
                     digit_bits: int):
    if not 1 <= digit_bits <= 16:
        raise ValueError(f"digit_bits must be in [1, 16], got {digit_bits}")
    if prefix_bits < 0 or prefix_bits + digit_bits > 32:
        raise ValueError("prefix_bits must be >= 0 with prefix_bits + digit_bits <= 32")
    if not 0 <= prefix < (1 << prefix_bits):
        raise ValueError(f"prefix must be in [0, 2^prefix_bits), got {prefix}")
    keys, nan = keys_of(scores, mode, seed, offset, base)
    bins = 1 << digit_bits
    keep = ~nan & ((keys >> (32 - prefix_bits)) == prefix)
    digit = (keys[keep] >> (32 - prefix_bits - digit_bits)) & (bins - 1)
    out = torch.bincount(digit.cpu(), minlength=bins)
    out = torch.cat([out, torch.tensor([int(nan.sum())])])
    return out.to(keys.device)


def select_tie_boundary(scores, mode: int, seed: int, offset: int, base: int, key: int, needed: int):
    if needed < 0:
        raise ValueError(f"needed must be >= 0, got {needed}")
    keys, nan = keys_of(scores, mode, seed, offset, base)
    ties = torch.nonzero(~nan & (keys == key)).reshape(-1)
    if needed == 0:
        b = base
    elif ties.numel() < needed:
        b = base + keys.numel()
    else:
        b = base + int(ties[needed - 1]) + 1
    return torch.tensor(b, dtype=torch.int64, device=keys.device)


def selection_mask(scores, mode, seed, offset, base, threshold, boundary):
    """The flat bool mask of the selected elements."""
    if not -1 <= threshold <= 1 << 32:
        raise ValueError(f"threshold must be in [-1, 2^32], got {threshold}")
    keys, nan = keys_of(scores, mode, seed, offset, base)
    idx = torch.arange(base, base + keys.numel(), device=keys.device)
    return ~nan & ((keys > threshold) | ((keys == threshold) & (idx < boundary)))


def box_muller(w0: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
    u1 = ((w0 >> 8).double() + 0.5) * 2.0**-24
    u2 = ((w1 >> 8).double() + 0.5) * 2.0**-24
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)).float()


def select_apply_(params, scores, source, masks, mode, seed, offset, base, threshold, boundary, action, alpha,
                  noise_seed, noise_offset):
    if action not in (ACT_SET, ACT_SCALE, ACT_NOISE, ACT_AXPY):
        raise ValueError(f"action must be 0 (set), 1 (scale), 2 (noise) or 3 (axpy), got {action}")
    if action == ACT_AXPY and len(source) != len(params):
        raise ValueError("action axpy needs a source tensor per param")
    if not scores and mode == KEY_RANDOM:
        scores = params
    sel = selection_mask(scores, mode, seed, offset, base, threshold, boundary)
    a = torch.tensor(alpha, dtype=torch.float32)
    start = 0
    for i, p in enumerate(params):
        n = p.numel()
        m = sel[start:start + n].reshape(p.shape)
        w = p.detach().float()
        if action == ACT_SET:
            new = source[i].float() if source else torch.zeros_like(w)
        elif action == ACT_SCALE:
            new = a.to(w.device) * w
        elif action == ACT_NOISE:
            idx = torch.arange(base + start, base + start + n, device=p.device)
            words = philox_words(idx, 2, noise_seed, noise_offset)
            new = w + a.to(w.device) * box_muller(words[:, 0], words[:, 1]).reshape(p.shape).to(w.device)
        else:
            new = w + a.to(w.device) * source[i].float()
        with torch.no_grad():
            p.copy_(torch.where(m, new, w).to(p.dtype))
        if masks:
            masks[i].copy_(m)
        start += n
    return torch.tensor(int(sel.sum()), dtype=torch.int64, device=sel.device)


def select_histogram_near(scores, mode: int, seed: int, offset: int, base: int, k: int):
    """The reference's bracket is every bin (lo_bin 0, hi_bin 2^16 - 1): the exact 16-bit histogram."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    h = select_histogram(scores, mode, seed, offset, base, 0, 0, 16)
    return torch.cat([h, torch.tensor([0, (1 << 16) - 1], device=h.device)])


def select_apply_bin_(params, scores, source, masks, mode, seed, offset, base, prefix, prefix_bits, needed, action,
                      alpha, noise_seed, noise_offset):
    """Everything above the bin `prefix` (top prefix_bits bits) and its `needed` largest keys (ties:
    lower index first), as (count, threshold, boundary) of select_apply_: the bin narrowed by the
    reference's histogram and tie passes (unlearn_ext/radix.py, the narrowing every backend uses),
    then one select_apply_."""
    if not 1 <= prefix_bits <= 32:
        raise ValueError(f"prefix_bits must be in [1, 32], got {prefix_bits}")
    if not 0 <= prefix < (1 << prefix_bits):
        raise ValueError(f"prefix must be in [0, 2^prefix_bits), got {prefix}")
    if needed < 0:
        raise ValueError(f"needed must be >= 0, got {needed}")
    keyed = scores if scores or mode != KEY_RANDOM else params  # shapes-only random mode: keys need no scores
    _check_mode(mode)
    _check_list(keyed, "scores")

    def histogram(prefix, prefix_bits, digit_bits):
        return select_histogram(keyed, mode, seed, offset, base, prefix, prefix_bits, digit_bits)

    def tie_boundary(key, need):
        return int(select_tie_boundary(keyed, mode, seed, offset, base, key, need))

    threshold, boundary = bin_selection(histogram, tie_boundary, prefix, prefix_bits, needed)
    count = select_apply_(params, scores, source, masks, mode, seed, offset, base, threshold, boundary, action, alpha,
                          noise_seed, noise_offset)
    return torch.tensor([int(count), threshold, boundary], dtype=torch.int64, device=count.device)


def select_mask_grad_(grads, scores, mode, seed, offset, base, threshold, boundary):
    sel = selection_mask(scores, mode, seed, offset, base, threshold, boundary)
    total = torch.zeros((), dtype=torch.float64)
    start = 0
    for g in grads:
        n = g.numel()
        m = sel[start:start + n].reshape(g.shape)
        with torch.no_grad():
            g.masked_fill_(~m, 0)
        total += (g.double() ** 2).sum().cpu()
        start += n
    return total.to(grads[0].device if grads else "cpu")
