"""Radix narrowing: the K-th largest of order-preserving 32-bit keys from digit histograms (docs/design.md
§7, our formulation). The one implementation, used by every backend: the selection module drives the
`select_histogram` op with it (CPU and CUDA, sharded lists through an all-reduced histogram), and the
pure-PyTorch reference of `select_apply_bin_` drives the reference's histograms with it.

A histogram is any callable histogram(prefix, prefix_bits, digit_bits) returning the int64 counts of
`select_histogram`: 2^digit_bits bins of the next digit_bits key bits among the keys whose top
prefix_bits bits equal prefix, then the NaN count. Each pass fixes one digit from the top; after 32
bits the key T is known, with the number r of elements of key T still to take (the r lowest global
indices: a tie pass finds them unless all ties are taken) -- selected iff key > T or (key == T and
index < boundary).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

Histogram = Callable[[int, int, int], torch.Tensor]

NOTHING = 1 << 32           # threshold above every key: selects nothing
ALL_TIES = (1 << 63) - 1    # boundary above every index: every tie at the threshold is selected


def narrow(counts: torch.Tensor, need: int, bits: int) -> tuple[int, int, int]:
    """One radix step: (bin b from the top that holds the need-th largest key, the need left inside
    b, the count of b) from a digit histogram's bin counts (NaN entry excluded)."""
    from_top = counts.flip(0).cumsum(0)  # elements in this bin or above
    j = int(torch.searchsorted(from_top, torch.tensor([need]))[0])  # first bin (from the top) reaching need
    b = (1 << bits) - 1 - j
    return b, need - (int(from_top[j]) - int(counts[b])), int(counts[b])


def check_first_histogram(h: torch.Tensor, k: int) -> None:
    """Refuses NaN scores and a k above the element count, from the first (unrestricted) histogram."""
    if int(h[-1]) > 0:
        raise ValueError(f"scores hold {int(h[-1])} NaN value(s); a selection needs an order")
    if int(h[:-1].sum()) < k:
        raise ValueError(f"k = {k} exceeds the number of elements ({int(h[:-1].sum())})")


def _narrow_digits(histogram: Histogram, prefix: int, prefix_bits: int, need: int, digits: Sequence[int],
                   first: torch.Tensor | None = None) -> tuple[int, int, int]:
    """(key, need left at it, its count) after one histogram pass per digit below the known prefix;
    `first`: the first digit's histogram when the caller already has it."""
    ties = 0
    for i, bits in enumerate(digits):
        h = first if i == 0 and first is not None else histogram(prefix, prefix_bits, bits).to("cpu", torch.int64)
        b, need, ties = narrow(h[:-1], need, bits)
        prefix, prefix_bits = (prefix << bits) | b, prefix_bits + bits
    return prefix, need, ties


def resolve_threshold(histogram: Histogram, k: int, plan: Sequence[int] = (16, 16),
                      start: tuple[int, int, int] = (0, 0, 0)) -> tuple[int, int, int]:
    """(threshold key T, ties needed r, ties present at T) for the top k of the whole list.

    The plan's digits must add up to 32 bits. start = (prefix, prefix_bits, need) continues a select
    whose first digits are already known (prefix_bits must be a sum of the plan's first digits)."""
    if sum(plan) != 32:
        raise ValueError(f"the digit plan must cover 32 bits, got {plan}")
    if k == 0:
        return NOTHING, 0, 0
    prefix, prefix_bits, need = start
    digits, known = list(plan), prefix_bits
    while known > 0:  # the digits that start already covers
        known -= digits.pop(0)
    first = None
    if prefix_bits == 0:  # the unrestricted pass: it sees every key, so it checks the request
        first = histogram(0, 0, digits[0]).to("cpu", torch.int64)
        check_first_histogram(first, k)
    return _narrow_digits(histogram, prefix, prefix_bits, need or k, digits, first)


def bin_selection(histogram: Histogram, tie_boundary: Callable[[int, int], int], prefix: int, prefix_bits: int,
                  needed: int, digit_bits: int = 16) -> tuple[int, int]:
    """(threshold, boundary) of the selection `select_apply_bin_` makes: every key whose top
    prefix_bits bits exceed prefix, and the `needed` largest keys of the bin `prefix` (ties: lower
    global index first; all of the bin if it holds fewer). tie_boundary(key, need) is the tie pass
    (`select_tie_boundary`); the bin is narrowed in digits of at most digit_bits bits."""
    top_of_bin = ((prefix + 1) << (32 - prefix_bits)) - 1  # nothing of the bin is taken
    if needed == 0:
        return top_of_bin, 0
    if prefix_bits == 32:  # a one-key bin: its count from the 1-bit digit that ends in it
        key, ties = prefix, int(histogram(prefix >> 1, 31, 1)[prefix & 1])
        need = min(needed, ties)
    else:
        left = 32 - prefix_bits
        digits = [digit_bits] * (left // digit_bits) + ([left % digit_bits] if left % digit_bits else [])
        first = histogram(prefix, prefix_bits, digits[0]).to("cpu", torch.int64)
        need = min(needed, int(first[:-1].sum()))
        if need > 0:
            key, need, ties = _narrow_digits(histogram, prefix, prefix_bits, need, digits, first)
    if need == 0:
        return top_of_bin, 0
    return key, ALL_TIES if need == ties else int(tie_boundary(key, need))
