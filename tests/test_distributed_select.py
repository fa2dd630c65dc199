"""Distributed Top-K / Random-k (unlearn_ext.distributed.selection) against the single-process
selection over the ranks' shards concatenated in rank order: threshold, boundary, count, masks and
a noise perturbation equal bit for bit. 2 and 3 ranks (3: uneven element counts, a tensor cut
across ranks, a rank holding an empty tensor); scores with many equal values, so the K-th largest
key is shared by elements on several ranks; bad input refused on every rank."""
from __future__ import annotations

import time

import pytest
import torch

from unlearn_ext import selection as S
from unlearn_ext import distributed as D
from distributed_setup import GROUP_TIMEOUT_S, launch

TIMEOUT_S = 60
SHAPES = [(13, 7), (50,), (3, 4, 5), (1,), (29,)]


def global_scores(seed: int) -> list[torch.Tensor]:
    """Scores in few distinct values (ties everywhere), some negative."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(-6, 7, s, generator=g).float() / 4) for s in SHAPES]


def shard_cuts(world: int) -> list[int]:
    """Uneven cut points of the flat vector: rank r takes flat[cuts[r]:cuts[r+1]]. Both cuts fall
    inside a tensor (the first holds 91 elements, the second 50); with 3 ranks, rank 1 holds none."""
    total = sum(torch.Size(s).numel() for s in SHAPES)
    if world == 2:
        return [0, 97, total]
    return [0, 40, 40, total] if world == 3 else [0, total]


def shard_of(flat_pieces: list[torch.Tensor], rank: int, world: int) -> list[torch.Tensor]:
    """Rank r's tensors: the pieces of the global tensors that fall into its cut (views reshaped
    as 1-D slices), or one empty tensor."""
    cuts = shard_cuts(world)
    lo, hi = cuts[rank], cuts[rank + 1]
    out, start = [], 0
    for t in flat_pieces:
        end = start + t.numel()
        a, b = max(lo, start), min(hi, end)
        if a < b:
            out.append(t.reshape(-1)[a - start:b - start].clone())
        start = end
    return out or [torch.empty(0)]


CASES = [("topk", 0.3, "abs"), ("topk", 37, "value"), ("topk", 0, "abs"), ("topk", 1.0, "abs"),
         ("topk", 1, "value"), ("random", 0.25, 11), ("random", 58, (1 << 63) + 5)]


def _selection(kind, k, arg, tensors, distributed):
    if kind == "topk":
        return (D.topk(tensors, k, by=arg) if distributed else S.topk(tensors, k, by=arg))
    return D.random_k(tensors, k, seed=arg) if distributed else S.random_k(tensors, k, seed=arg)


def _outcome(sel, tensors):
    """What the comparison looks at: the resolved rule, the count, the masks and a noise apply."""
    flat = lambda ts: torch.cat([t.reshape(-1) for t in ts]) if ts else torch.empty(0)
    params = [t.clone() * 0 + 1 for t in tensors]
    count, masks = sel.apply_(params, "noise", alpha=0.5, masks=True, noise_seed=9, noise_offset=4)
    return {"threshold": sel.threshold, "boundary": sel.boundary, "k": sel.count, "applied": count,
            "masks": flat(masks), "params": flat(params)}


def select_worker(rank, world):
    results = []
    for case_seed, (kind, k, arg) in enumerate(CASES):
        local = shard_of(global_scores(case_seed), rank, world)
        results.append(_outcome(_selection(kind, k, arg, local, True), local))
    return results


def refusal_worker(rank, world):
    """Each bad call is refused on every rank with a message naming the problem (no rank waits)."""
    local = shard_of(global_scores(0), rank, world)
    messages = []
    calls = [
        lambda: D.topk(local, 10 + rank, by="abs"),                            # ranks disagree on k
        lambda: D.topk(local if rank else [t.long() for t in local], 5),       # one rank's dtype
        lambda: D.topk(local, 10**9),                                          # k above the global count
        lambda: D.topk([t.clone().fill_(float("nan")) if rank == world - 1 else t for t in local], 3),
        lambda: D.random_k(local, 3, seed=-1),                                 # refused seed everywhere
    ]
    for call in calls:
        try:
            call()
            messages.append(None)
        except (ValueError, TypeError) as exc:
            messages.append(f"{type(exc).__name__}: {exc}")
    return messages


def _expected(world):
    out = []
    for case_seed, (kind, k, arg) in enumerate(CASES):
        scores = global_scores(case_seed)
        whole = [torch.cat([t.reshape(-1) for t in scores])]  # the concatenation in rank order
        out.append(_outcome(_selection(kind, k, arg, whole, False), whole))
    return out


def _check_equal(world, got):
    for case, want in zip(CASES, _expected(world)):
        parts = [got[r][CASES.index(case)] for r in range(world)]
        for r, part in enumerate(parts):
            assert (part["threshold"], part["boundary"], part["k"]) == \
                   (want["threshold"], want["boundary"], want["k"]), (case, r)
        assert sum(p["applied"] for p in parts) == want["applied"], case
        assert torch.equal(torch.cat([p["masks"] for p in parts]), want["masks"]), case
        assert torch.equal(torch.cat([p["params"] for p in parts]), want["params"]), case


def select_then_lose_a_rank_worker(rank, world):
    """The selections; then the last rank leaves, and the others' next selection must raise
    within the group's timeout instead of waiting for it."""
    results = select_worker(rank, world)
    if rank == world - 1:
        return results, None
    began = time.monotonic()
    try:
        D.topk(shard_of(global_scores(0), rank, world), 5)
        return results, ("no error", time.monotonic() - began)
    except RuntimeError as exc:  # gloo: the peer closed its connection, or the timeout
        return results, (f"{type(exc).__name__}: {exc}", time.monotonic() - began)


def test_two_ranks_select_as_one_process_and_a_lost_rank_raises():
    got = launch(select_then_lose_a_rank_worker, 2, TIMEOUT_S)
    _check_equal(2, [g[0] for g in got])
    message, seconds = got[0][1]
    assert message != "no error"
    assert seconds <= GROUP_TIMEOUT_S + 5, (message, seconds)


def select_then_refuse_worker(rank, world):
    return select_worker(rank, world), refusal_worker(rank, world)


def test_three_ranks_uneven_shards_select_as_one_process_and_refuse_bad_input_everywhere():
    """One launch (process start-up dominates the time): the selections, then the refusals."""
    got = launch(select_then_refuse_worker, 3, TIMEOUT_S)
    _check_equal(3, [g[0] for g in got])
    _check_refusals([g[1] for g in got])
    # The cases really split a tie class across ranks (the boundary lies inside a rank that is
    # not the first): otherwise the tie exchange would go untested.
    cuts = shard_cuts(3)
    inside = [w["boundary"] for w in _expected(3) if w["boundary"] != S.ALL_TIES]
    assert any(cuts[1] < b <= cuts[3] for b in inside)


def _check_refusals(messages):
    for r, per_rank in enumerate(messages):
        assert all(m is not None for m in per_rank), (r, per_rank)
        assert "disagree on k" in per_rank[0]
        assert "rank(s) [0] refused" in per_rank[1]
        assert "exceeds" in per_rank[2] or "k must be in" in per_rank[2]
        assert "NaN" in per_rank[3]
        assert "refused" in per_rank[4]
    assert "dtype torch.int64" in messages[0][1]  # the refusing rank says why


def test_requires_an_initialized_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        D.topk([torch.ones(3)], 1)
