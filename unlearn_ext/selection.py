"""Exact Top-K and Random-k selection over a tensor list read as one vector (docs/design.md §7, our
formulation), on the `select_*` ops.

How a top-K is found (radix select on order-preserving 32-bit keys, see csrc/include/unlearn/select.h):
one histogram pass per radix digit (16 + 16 bits on the CPU, 11 + 11 + 10 on CUDA, where 2^11 bins
fit shared memory), each restricted to the keys that share the prefix found so far, narrows the
K-th largest key down to one value T and the number r of elements with key T that still have to
be taken; those are the r lowest global indices with key T, found by one tie pass only when fewer
than all of them are needed. The result is (T, boundary): selected iff key > T or (key == T and
index < boundary) -- exactly K elements, no concatenated copy, O(histogram) extra memory. The
fused apply pass (`Selection.apply_`) re-derives each element's key and perturbs in place.

The fast path on the CPU (`topk`, `random_k`) is the two-pass form of the same select: the first
pass (`select_histogram_near`) counts the top 16 key bits one by one only inside a bracket of bins
that a sample of the keys places around the K-th largest (everything else is counted in bulk, and
a bracket that misses is detected here and answered by the plain first pass); the threshold bin
is then known, and when it holds at most CANDIDATE_CAP keys the selection stays *pending* until
`apply_`, whose single pass (`select_apply_bin_`) perturbs every key above that bin, keeps the
bin's keys and resolves them exactly -- the second histogram pass and the tie pass folded into
the apply. Reading `threshold` / `boundary` (or any other use) before an apply resolves a pending
selection with the histogram passes; both routes give the same (T, boundary) bit for bit. A
pending selection reads the scores when it is resolved: do not modify them in between.

The narrowing itself (`resolve_threshold`, `narrow`) is unlearn_ext/radix.py, shared with the
reference. Distributed selection (docs/design.md §12): histograms of shards add up to the histogram of
the whole list, so `resolve_threshold` takes any `histogram(prefix, prefix_bits, digit_bits)` callable;
give it one that all-reduces the shard histograms (each shard calls the op with `base` = the
global index of its first element) and every rank gets the same (T, boundary).

K is a count (int) or a fraction of the list (float, rounded half up: floor(f * N + 0.5)).
Scores are ranked by |score| (`by="abs"`, saliency, the default) or as given (`by="value"`);
NaN scores are refused.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from . import ops
from .checks import seed_args
from .radix import ALL_TIES, NOTHING, check_first_histogram, narrow, resolve_threshold  # noqa: F401 (API)
from .rng_format import UNIFORM_LEVELS

KEY_MODES = {"value": 0, "abs": 1, "random": 2}
ACTIONS = {"reset": 0, "dampen": 1, "noise": 2, "axpy": 3}
FIRST_DIGIT_BITS = 16       # the CPU plan's first digit (select_histogram_near's bins)
CANDIDATE_CAP = 1 << 16     # most keys a fused apply keeps from the threshold bin (16 bytes each)


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


class Selection:
    """The exact selection (threshold, boundary) over a list of `total` elements with keys of
    `mode` (0 value, 1 abs, 2 random at (seed, offset)); `count` elements are selected.

    A selection made by `topk` / `random_k` may be pending: its threshold bin is known and the
    rest is resolved by the first `apply_` (in the same pass) or, for any other use, by the
    remaining histogram passes (module docstring)."""

    def __init__(self, mode: int, threshold: int | None, boundary: int | None, count: int, total: int,
                 seed: int = 0, offset: int = 0, base: int = 0, scores=None, pending: tuple[int, int] | None = None,
                 shapes=None):
        self.mode, self.count, self.total = mode, count, total
        self.seed, self.offset, self.base = seed, offset, base
        self.scores = list(scores) if scores else []  # the key source ([] for random keys)
        self._threshold, self._boundary = threshold, boundary
        self._pending = pending  # (threshold bin of the first digit, keys still needed from it)
        self._shapes = list(shapes) if shapes is not None else self.scores  # what a pending random select walks
        # Every later use re-reads the scores (a pending selection finishes on them; masks re-derive
        # from them), so an in-place write between selecting and using would silently select other
        # coordinates: remember the version counters and refuse instead.
        self._versions = [_version_of(t) for t in self.scores]

    def __repr__(self) -> str:
        where = f"pending bin {self._pending[0]:#x}" if self._pending else \
            f"threshold={self._threshold}, boundary={self._boundary}"
        return f"Selection(mode={self.mode}, {where}, count={self.count}, total={self.total})"

    @property
    def pending(self) -> bool:
        return self._pending is not None

    @property
    def threshold(self) -> int:
        self._resolve()
        return self._threshold

    @property
    def boundary(self) -> int:
        self._resolve()
        return self._boundary

    def _check_scores_unchanged(self) -> None:
        changed = [i for i, t in enumerate(self.scores) if _version_of(t) != self._versions[i]]
        if changed:
            raise RuntimeError(f"score tensor(s) {changed} were modified in place after the selection was made; "
                               "the selection reads them when used: select again after changing the scores")

    def _resolve(self) -> None:
        """A pending selection finished by the second histogram pass (and a tie pass if needed)."""
        if self._pending is None:
            return
        self._check_scores_unchanged()
        prefix, need = self._pending
        scores = self.scores if self.scores else self._shapes
        threshold, need, ties = resolve_threshold(_histogram_of(scores, self.mode, self.seed, self.offset, self.base),
                                                  self.count, (FIRST_DIGIT_BITS, 32 - FIRST_DIGIT_BITS),
                                                  (prefix, FIRST_DIGIT_BITS, need))
        self._threshold = threshold
        self._boundary = _boundary(scores, self.mode, self.seed, self.offset, self.base, threshold, need, ties)
        self._pending = None

    def _args(self):
        return (self.mode, self.seed, self.offset, self.base, self.threshold, self.boundary)

    def apply_(self, params, action: str = "reset", alpha: float = 0.0, source=None, masks: bool = False,
               noise_seed: int = 0, noise_offset: int = 0):
        """Perturbs the selected coordinates of params in place (one fused pass):
        reset (to `source`, e.g. the initial weights, or to 0), dampen (w *= alpha), noise
        (w += alpha * z, z from the RNG contract at (noise_seed, noise_offset)), axpy (w += alpha * source).
        Returns (count, masks) where masks is a list of bool tensors shaped like params, or None."""
        params = list(params)
        noise_seed, noise_offset = seed_args(noise_seed, noise_offset)
        out = [torch.empty(p.shape, dtype=torch.bool, device=p.device) for p in params] if masks else []
        source = list(source) if source is not None else []
        self._check_scores_unchanged()
        if self._pending is not None:
            prefix, need = self._pending
            got = ops.select_apply_bin_(params, self.scores, source, out, self.mode, self.seed, self.offset,
                                        self.base, prefix, FIRST_DIGIT_BITS, need, ACTIONS[action], float(alpha),
                                        noise_seed, noise_offset)
            count, self._threshold, self._boundary = (int(x) for x in got.tolist())
            self._pending = None
        else:
            count = int(ops.select_apply_(params, self.scores, source, out, self.mode, self.seed, self.offset,
                                          self.base, self.threshold, self.boundary, ACTIONS[action], float(alpha),
                                          noise_seed, noise_offset))
        return count, (out if masks else None)

    def mask_grad_(self, grads) -> float:
        """Zeroes the unselected gradient coordinates in place; returns the kept squared norm."""
        self._check_scores_unchanged()
        scores = self.scores if self.scores else list(grads)
        return float(ops.select_mask_grad_(list(grads), scores, *self._args()))

    def masks(self, like) -> list[torch.Tensor]:
        """Bool masks of the selection, shaped like `like` (nothing is modified)."""
        self._check_scores_unchanged()
        like = list(like)
        probe = [torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in like]
        scores = self.scores if self.scores else probe
        out = [torch.empty(t.shape, dtype=torch.bool, device=t.device) for t in like]
        ops.select_apply_(probe, scores, [], out, *self._args(), ACTIONS["dampen"], 1.0, 0, 0)
        return out


def _version_of(t: torch.Tensor):
    """The tensor's in-place version counter (None for inference-mode tensors, which have none)."""
    try:
        return t._version
    except RuntimeError:
        return None


def _numel(tensors) -> int:
    return sum(t.numel() for t in tensors)


def _histogram_of(scores, mode, seed, offset, base):
    def histogram(prefix, prefix_bits, digit_bits):
        return ops.select_histogram(scores, mode, seed, offset, base, prefix, prefix_bits, digit_bits)
    return histogram


def _boundary(scores, mode, seed, offset, base, threshold, need, ties) -> int:
    if need == ties:
        return ALL_TIES
    return int(ops.select_tie_boundary(scores, mode, seed, offset, base, threshold, need))


def _first_digit_near(scores, mode, k, seed, offset, base):
    """(threshold bin, need inside it, its count) from select_histogram_near, or None when the
    sampled bracket missed the K-th largest key (the caller then counts every bin)."""
    h = ops.select_histogram_near(scores, mode, seed, offset, base, k).to("cpu", torch.int64)
    bins = 1 << FIRST_DIGIT_BITS
    check_first_histogram(h[:bins + 1], k)
    lo_bin, hi_bin = int(h[bins + 1]), int(h[bins + 2])
    # Only the bracket and the two lumped bins next to it can be non-zero, so the radix step runs on
    # that slice (tens of bins instead of 2^16; the same bin, since the zeros around it change no
    # cumulative count from the top).
    lo, hi = max(lo_bin - 1, 0), min(hi_bin + 1, bins - 1)
    width = max(1, (hi - lo + 1)).bit_length()
    part = torch.zeros(1 << width, dtype=torch.int64)
    part[:hi - lo + 1] = h[lo:hi + 1]
    b, need, count = narrow(part, k, width)
    b += lo
    return (b, need, count) if lo_bin <= b <= hi_bin else None


def _select(scores, mode: int, k, seed: int = 0, offset: int = 0, base: int = 0) -> Selection:
    scores = list(scores)
    total = _numel(scores)
    k = resolve_k(k, total)
    device = scores[0].device if scores else torch.device("cpu")
    key_source = [] if mode == KEY_MODES["random"] else scores
    plan = digit_plan(device)
    histogram = _histogram_of(scores, mode, seed, offset, base)
    if k > 0 and plan[0] == FIRST_DIGIT_BITS:
        first = _first_digit_near(scores, mode, k, seed, offset, base)
        if first is None:  # the bracket missed: the plain first pass
            h = histogram(0, 0, FIRST_DIGIT_BITS).to("cpu", torch.int64)
            check_first_histogram(h, k)
            first = narrow(h[:-1], k, FIRST_DIGIT_BITS)
        b, need, count = first
        if count <= CANDIDATE_CAP:  # the rest of the select rides on the apply pass
            return Selection(mode, None, None, k, total, seed, offset, base, key_source, pending=(b, need),
                             shapes=scores)
        threshold, need, ties = resolve_threshold(histogram, k, plan, (b, FIRST_DIGIT_BITS, need))
    else:
        threshold, need, ties = resolve_threshold(histogram, k, plan)
    boundary = _boundary(scores, mode, seed, offset, base, threshold, need, ties)
    return Selection(mode, threshold, boundary, k, total, seed, offset, base, key_source)


def topk(scores: Sequence[torch.Tensor], k, by: str = "abs") -> Selection:
    """The exact global top-k of a list of score tensors (ties: lower global index first)."""
    if by not in ("abs", "value"):
        raise ValueError(f"by must be 'abs' or 'value', got {by!r}")
    return _select(scores, KEY_MODES[by], k)


def random_k(like: Sequence[torch.Tensor], k, seed: int, offset: int = 0) -> Selection:
    """Exactly k uniformly random coordinates of the list (Philox keys of the RNG contract; seed and
    offset are unsigned 64-bit)."""
    seed, offset = seed_args(seed, offset)
    return _select([t.detach() for t in like], KEY_MODES["random"], k, seed, offset)


def bernoulli(like: Sequence[torch.Tensor], p: float, seed: int, offset: int = 0) -> Selection:
    """Each coordinate independently with probability p: draw 0 of philox_bernoulli at (seed, offset)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    seed, offset = seed_args(seed, offset)
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
    """Per-tensor top-k (the option of docs/design.md §7): k (a fraction, or a count per tensor) of
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
    """The exact top-k of each score tensor on its own (k a count for every tensor, or a fraction)."""
    parts = []
    for i, s in enumerate(scores):
        try:
            parts.append(topk([s], k, by))
        except ValueError as exc:  # name the tensor: k fits some tensors of the list and not others
            raise ValueError(f"scores[{i}] (shape {list(s.shape)}): {exc}") from None
    return PerTensorSelection(parts)
