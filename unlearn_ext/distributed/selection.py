"""Exact Top-K and Random-k over parameters sharded across the ranks of a process group
(docs/design.md §12 and §7; the selection rule is selection.py's).

The parameter vector is the ranks' local tensor lists concatenated in rank order: rank r's first
element has global index base_r = the element count of ranks 0..r-1. Because a histogram of the
whole vector is the sum of the shards' histograms, each radix pass costs one all-reduce of
2^digit_bits + 1 int64 counts (the CPU plan: two passes of 65537 counts, 512 KiB each), whatever
the size of the vector; the scores never leave their rank. Every rank narrows the same threshold
key T from the same reduced counts. If only some of the elements with key T are taken, the ones
with the lowest global indices are (the single-process rule): the ranks exchange their tie counts
(one int64 each), the rank holding the last needed tie finds its global index with the tie pass,
and one all-reduce (max) hands that boundary to every rank.

The result is a `selection.Selection` over this rank's tensors with `base` = base_r: its apply_,
masks and mask_grad_ act on the local shard exactly as the single-process selection acts on those
coordinates (Random-k keys and noise draws are Philox values at global indices).
"""
from __future__ import annotations

import struct
from typing import Sequence

import torch
import torch.distributed as dist

from .. import ops
from ..checks import seed_args
from ..selection import (ALL_TIES, KEY_MODES, NOTHING, Selection, digit_plan, resolve_k, resolve_threshold)
from .group import agree, exchange_device, require_group

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def topk(scores: Sequence[torch.Tensor], k, by: str = "abs", group=None) -> Selection:
    """The exact global top-k of the score tensors of every rank (this rank passes its own shard;
    k is a count or a fraction of the global element count). Ties: lower global index first.
    Collective: every rank of `group` must call it with the same k and `by`."""
    if by not in ("abs", "value"):
        problem = ValueError(f"by must be 'abs' or 'value', got {by!r}")
        return _select(scores, None, k, 0, 0, group, problem)
    return _select(scores, KEY_MODES[by], k, 0, 0, group)


def random_k(like: Sequence[torch.Tensor], k, seed: int, offset: int = 0, group=None) -> Selection:
    """Exactly k uniformly random coordinates of the global vector: the same coordinates as the
    single-process `selection.random_k` over the concatenation (Philox keys at global indices).
    Collective: every rank must pass the same k, seed and offset."""
    try:
        seed, offset = seed_args(seed, offset)
    except (ValueError, TypeError) as exc:
        return _select(like, None, k, 0, 0, group, exc)
    return _select([t.detach() for t in like], KEY_MODES["random"], k, seed, offset, group)


def histogram_bytes_per_pass(device: torch.device | str = "cpu") -> list[int]:
    """Bytes each rank contributes to the all-reduce of each radix pass (int64 counts, NaN bin
    included); the tie exchange adds 8 bytes per rank and 8 for the boundary when it runs."""
    return [((1 << bits) + 1) * 8 for bits in digit_plan(torch.device(device))]


def _encode_k(k) -> tuple[int, int]:
    """(kind, bits) of a count or a fraction, so the ranks can compare k exactly."""
    if isinstance(k, bool):
        raise TypeError("k must be an int count or a float fraction, not a bool")
    if isinstance(k, float):
        return 1, struct.unpack("<q", struct.pack("<d", k))[0]
    if not isinstance(k, int):
        raise TypeError(f"k must be an int count or a float fraction, got {type(k).__name__}")
    return 0, k


def _decode_k(kind: int, bits: int):
    return struct.unpack("<d", struct.pack("<q", bits))[0] if kind == 1 else bits


def _check_shard(scores: list[torch.Tensor]) -> None:
    if not scores:
        raise ValueError("this rank passed no tensors: pass its shard (a rank without elements passes one "
                         "empty tensor of the shard's dtype and device)")
    first = scores[0]
    for i, t in enumerate(scores):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"scores[{i}] is a {type(t).__name__}, not a tensor")
        if t.dtype not in _KERNEL_DTYPES:
            raise TypeError(f"scores[{i}] has dtype {t.dtype}; selection takes float32, float16 or bfloat16")
        if t.dtype != first.dtype or t.device != first.device:
            raise ValueError(f"scores[{i}] is {t.dtype} on {t.device}, scores[0] {first.dtype} on {first.device}: "
                             "one dtype and device per shard")


def _select(scores, mode, k, seed: int, offset: int, group, problem: Exception | None = None) -> Selection:
    group = require_group(group)
    scores = list(scores)

    def check():
        if problem is not None:
            raise problem
        _check_shard(scores)
        return (mode, *_encode_k(k), seed, offset, sum(t.numel() for t in scores))

    rows = agree(check, shared=("key mode", "k kind", "k", "seed", "offset"), local=("element count",),
                 group=group)
    counts = rows[:, -1].tolist()
    rank = dist.get_rank(group)
    base, total = sum(counts[:rank]), sum(counts)
    k = resolve_k(_decode_k(int(rows[0, 1]), int(rows[0, 2])), total)  # the same answer (or error) on every rank
    device = scores[0].device
    if k == 0:
        return Selection(mode, NOTHING, ALL_TIES, 0, total, seed, offset, base, _key_source(scores, mode))
    last_local = []  # this rank's counts of the latest pass, before the reduction

    def histogram(prefix: int, prefix_bits: int, digit_bits: int) -> torch.Tensor:
        local = ops.select_histogram(scores, mode, seed, offset, base, prefix, prefix_bits, digit_bits)
        last_local[:] = [local.to("cpu", torch.int64)]
        summed = local.to(exchange_device(group), torch.int64).clone()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
        return summed

    threshold, need, ties = resolve_threshold(histogram, k, digit_plan(device))
    boundary = ALL_TIES
    if need != ties:
        local_ties = int(last_local[0][threshold & ((1 << digit_plan(device)[-1]) - 1)])
        boundary = _tie_boundary(scores, mode, seed, offset, base, threshold, need, local_ties, group)
    return Selection(mode, threshold, boundary, k, total, seed, offset, base, _key_source(scores, mode))


def _key_source(scores, mode):
    return [] if mode == KEY_MODES["random"] else scores


def _tie_boundary(scores, mode, seed, offset, base, threshold, need, local_ties, group) -> int:
    """One past the global index of the need-th element with key `threshold` (rank order, then
    index order within a rank), found by the one rank that holds it."""
    device = exchange_device(group)
    mine = torch.tensor([local_ties], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    ties = [int(t) for t in every]
    rank = dist.get_rank(group)
    before = sum(ties[:rank])
    found = torch.tensor([-1], dtype=torch.int64, device=device)
    if before < need <= before + ties[rank]:
        found[0] = int(ops.select_tie_boundary(scores, mode, seed, offset, base, threshold, need - before))
    dist.all_reduce(found, op=dist.ReduceOp.MAX, group=group)
    return int(found[0])
