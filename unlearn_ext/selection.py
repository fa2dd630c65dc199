"""Exact Top-K and Random-k selection over a tensor list read as one vector (DESIGN section 7, our
formulation), on the `select_*` ops.

How a top-K is found (radix select on order-preserving 32-bit keys, see csrc/include/unlearn/select.h):
one histogram pass per radix digit (16 + 16 bits on the CPU, 11 + 11 + 10 on CUDA, where 2^11 bins
fit shared memory), each restricted to the keys that share the prefix found so far, narrows the
K-th largest key down to one value T and the number r of elements with key T that still have to
be taken; those are the r lowest global indices with key T, found by one tie pass only when fewer
than all of them are needed. The result is (T, boundary): selected iff key > T or (key == T and
index < boundary) -- exactly K elements, no concatenated copy, O(histogram) extra memory. The
fused apply pass (`Selection.apply_`) re-derives each element's key and perturbs in place.

Distributed selection (DESIGN section 12): histograms of shards add up to the histogram of the
whole list, so `resolve_threshold` takes any `histogram(prefix, prefix_bits, digit_bits)` callable;
give it one that all-reduces the shard histograms (each shard calls the op with `base` = the
global index of its first element) and every rank gets the same (T, boundary).

K is a count (int) or a fraction of the list (float, rounded half up: floor(f * N + 0.5)).
Scores are ranked by |score| (`by="abs"`, saliency, the default) or as given (`by="value"`);
NaN scores are refused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from . import ops

KEY_MODES = {"value": 0, "abs": 1, "random": 2}
ACTIONS = {"reset": 0, "dampen": 1, "noise": 2, "axpy": 3}
NOTHING = 1 << 32           # threshold above every key: selects nothing
ALL_TIES = (1 << 63) - 1    # boundary above every index: every tie at the threshold is selected


def resolve_k(k, total: int) -> int:
    """K as a count (int) or a fraction of `total` (float in [0, 1], rounded half up)."""
    if isinstance(k, bool):
        raise TypeError("k must be an int count or a float fraction, not a bool")
    if isinstance(k, float):
        if not 0.0 <= k <= 1.0:
            raise ValueError(f"a fractional k must be in [0, 1], got {k}")
        return min(total, int(math.floor(k * total + 0.5)))
    k = int(k)
    if not 0 <= k <= total:
        raise ValueError(f"k must be in [0, {total}] (the number of elements), got {k}")
    return k


def digit_plan(device: torch.device) -> tuple[int, ...]:
    return (11, 11, 10) if device.type == "cuda" else (16, 16)


def resolve_threshold(histogram: Callable[[int, int, int], torch.Tensor], k: int,
                      plan: Sequence[int] = (16, 16)) -> tuple[int, int, int]:
    """(threshold key T, ties needed r, ties present at T) for the top k, from digit histograms.

    histogram(prefix, prefix_bits, digit_bits) returns the int64 counts of select_histogram
    (summed over shards when the list is sharded); the plan's digits must add up to 32 bits."""
    if sum(plan) != 32:
        raise ValueError(f"the digit plan must cover 32 bits, got {plan}")
    if k == 0:
        return NOTHING, 0, 0
    prefix, prefix_bits, need, ties = 0, 0, k, 0
    for bits in plan:
        h = histogram(prefix, prefix_bits, bits).to("cpu", torch.int64)
        if prefix_bits == 0 and int(h[-1]) > 0:
            raise ValueError(f"scores hold {int(h[-1])} NaN value(s); a selection needs an order")
        counts = h[:-1]
        from_top = counts.flip(0).cumsum(0)  # elements in this bin or above
        if prefix_bits == 0 and int(from_top[-1]) < k:
            raise ValueError(f"k = {k} exceeds the number of elements ({int(from_top[-1])})")
        j = int(torch.searchsorted(from_top, torch.tensor([need]))[0])  # first bin (from the top) reaching need
        b = (1 << bits) - 1 - j
        need -= int(from_top[j]) - int(counts[b])  # taken wholesale: everything in the bins above b
        ties = int(counts[b])
        prefix, prefix_bits = (prefix << bits) | b, prefix_bits + bits
    return prefix, need, ties


@dataclass
class Selection:
    """The exact selection (threshold, boundary) over a list of `total` elements with keys of
    `mode` (0 value, 1 abs, 2 random at (seed, offset)); `count` elements are selected."""
    mode: int
    threshold: int
    boundary: int
    count: int
    total: int
    seed: int = 0
    offset: int = 0
    base: int = 0
    scores: list = field(default_factory=list, repr=False)  # the key source ([] for random keys)

    def _args(self):
        return (self.mode, self.seed, self.offset, self.base, self.threshold, self.boundary)

    def apply_(self, params, action: str = "reset", alpha: float = 0.0, source=None, masks: bool = False,
               noise_seed: int = 0, noise_offset: int = 0):
        """Perturbs the selected coordinates of params in place (one fused pass):
        reset (to `source`, e.g. the initial weights, or to 0), dampen (w *= alpha), noise
        (w += alpha * z, z from the RNG contract at (noise_seed, noise_offset)), axpy (w += alpha * source).
        Returns (count, masks) where masks is a list of bool tensors shaped like params, or None."""
        params = list(params)
        out = [torch.empty(p.shape, dtype=torch.bool, device=p.device) for p in params] if masks else []
        count = ops.select_apply_(params, self.scores, list(source) if source is not None else [], out,
                                  *self._args()[:4], self.threshold, self.boundary, ACTIONS[action], float(alpha),
                                  noise_seed, noise_offset)
        return int(count), (out if masks else None)

    def mask_grad_(self, grads) -> float:
        """Zeroes the unselected gradient coordinates in place; returns the kept squared norm."""
        scores = self.scores if self.scores else list(grads)
        return float(ops.select_mask_grad_(list(grads), scores, *self._args()))

    def masks(self, like) -> list[torch.Tensor]:
        """Bool masks of the selection, shaped like `like` (nothing is modified)."""
        like = list(like)
        probe = [torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in like]
        scores = self.scores if self.scores else probe
        out = [torch.empty(t.shape, dtype=torch.bool, device=t.device) for t in like]
        ops.select_apply_(probe, scores, [], out, *self._args(), ACTIONS["dampen"], 1.0, 0, 0)
        return out


def _numel(tensors) -> int:
    return sum(t.numel() for t in tensors)


def _select(scores, mode: int, k, seed: int = 0, offset: int = 0, base: int = 0) -> Selection:
    scores = list(scores)
    total = _numel(scores)
    k = resolve_k(k, total)
    device = scores[0].device if scores else torch.device("cpu")

    def histogram(prefix, prefix_bits, digit_bits):
        return ops.select_histogram(scores, mode, seed, offset, base, prefix, prefix_bits, digit_bits)

    threshold, need, ties = resolve_threshold(histogram, k, digit_plan(device))
    if need == ties:
        boundary = ALL_TIES
    else:
        boundary = int(ops.select_tie_boundary(scores, mode, seed, offset, base, threshold, need))
    return Selection(mode, threshold, boundary, k, total, seed, offset, base,
                     [] if mode == KEY_MODES["random"] else scores)


def topk(scores: Sequence[torch.Tensor], k, by: str = "abs") -> Selection:
    """The exact global top-k of a list of score tensors (ties: lower global index first)."""
    if by not in ("abs", "value"):
        raise ValueError(f"by must be 'abs' or 'value', got {by!r}")
    return _select(scores, KEY_MODES[by], k)


def random_k(like: Sequence[torch.Tensor], k, seed: int, offset: int = 0) -> Selection:
    """Exactly k uniformly random coordinates of the list (Philox keys of the RNG contract)."""
    sel = _select([t.detach() for t in like], KEY_MODES["random"], k, seed, offset)
    return sel


def bernoulli(like: Sequence[torch.Tensor], p: float, seed: int, offset: int = 0) -> Selection:
    """Each coordinate independently with probability p: draw 0 of philox_bernoulli at (seed, offset)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    from .reference.rng import UNIFORM_LEVELS
    levels = _levels_below(p, UNIFORM_LEVELS)
    total = _numel(like)
    sel = Selection(KEY_MODES["random"], (1 << 32) - 256 * levels - 1, 0, -1, total, seed, offset)
    return sel


def _levels_below(p: float, levels: int) -> int:
    """Levels k with (k + 0.5) 2^-24 < p (csrc/include/unlearn/philox.h levels_below)."""
    if not p > 0.0:
        return 0
    if p >= 1.0:
        return levels
    t = math.ceil((p * 2.0**25 - 1.0) * 0.5)
    return max(0, min(levels, t))


class PerTensorSelection:
    """Per-tensor top-k (the option of DESIGN section 7): k (a fraction, or a count per tensor) of
    each tensor separately; the same apply_/mask_grad_/masks interface, one op call per tensor."""

    def __init__(self, parts: list[Selection]):
        self.parts = parts
        self.count = sum(p.count for p in parts)
        self.total = sum(p.total for p in parts)

    def apply_(self, params, action="reset", alpha=0.0, source=None, masks=False, noise_seed=0, noise_offset=0):
        params = list(params)
        count, out = 0, []
        for i, (part, p) in enumerate(zip(self.parts, params)):
            c, m = part.apply_([p], action, alpha, None if source is None else [source[i]], masks, noise_seed,
                               noise_offset)
            count += c
            out += m or []
        return count, (out if masks else None)

    def mask_grad_(self, grads) -> float:
        return sum(part.mask_grad_([g]) for part, g in zip(self.parts, grads))

    def masks(self, like):
        return [part.masks([t])[0] for part, t in zip(self.parts, like)]


def topk_per_tensor(scores: Sequence[torch.Tensor], k, by: str = "abs") -> PerTensorSelection:
    parts = []
    for s in scores:
        sel = topk([s], k, by)
        parts.append(sel)
    return PerTensorSelection(parts)
