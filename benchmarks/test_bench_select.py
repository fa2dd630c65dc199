"""Global top-1% select + perturb (reset) on 11.7M fp32 parameters in 62 tensors (ResNet-18
shapes), DESIGN section 9. Baselines in the same run, each also perturbing the selection:
* torch.topk on a concatenated |score| vector, then index_fill_ of the concatenated parameters'
  selected entries written back (what a practitioner writes with torch.topk);
* the double-argsort mask of saliency-unlearning code (rank = argsort(argsort(|s|)), mask = rank >=
  N - K), then params.mul_(~mask) per tensor.
"""
from __future__ import annotations


import pytest
import torch

from unlearn_ext import selection as S
from workloads import DEVICE, gradient_list, run_timed

FRACTION = 0.01



@pytest.fixture(scope="module")
def scores():
    return gradient_list(scale=1e-2, seed=1, device=DEVICE)


@pytest.fixture(scope="module")
def params():
    return gradient_list(scale=1e-1, seed=2, device=DEVICE)


def _run(benchmark, fn, rounds):
    return run_timed(benchmark, fn, rounds, warmup_rounds=1)


def kernel_select_reset(scores, params):
    sel = S.topk(scores, FRACTION)
    return sel.apply_(params, "reset")[0]


def kernel_histogram_route_reset(scores, params):
    """The same select resolved by the histogram passes before the apply (the route a sharded
    caller takes): the fused route's gain over it is the second pass it saves."""
    sel = S.topk(scores, FRACTION)
    sel.threshold  # resolves the pending selection: second histogram pass (+ tie pass)
    return sel.apply_(params, "reset")[0]


def kernel_random_k_reset(scores, params):
    sel = S.random_k(params, FRACTION, seed=3)
    return sel.apply_(params, "reset")[0]


def topk_select_reset(scores, params):
    flat = torch.cat([s.reshape(-1).abs() for s in scores])
    k = S.resolve_k(FRACTION, flat.numel())
    idx = torch.topk(flat, k, sorted=False).indices
    p = torch.cat([q.reshape(-1) for q in params])
    p.index_fill_(0, idx, 0.0)
    start = 0
    for q in params:  # write back into the parameter tensors
        q.copy_(p[start:start + q.numel()].view_as(q))
        start += q.numel()
    return k


def double_argsort_select_reset(scores, params):
    flat = torch.cat([s.reshape(-1).abs() for s in scores])
    k = S.resolve_k(FRACTION, flat.numel())
    rank = flat.argsort().argsort()
    mask = rank >= flat.numel() - k
    start = 0
    for q in params:
        q.mul_(~mask[start:start + q.numel()].view_as(q))
        start += q.numel()
    return k


def test_select_reset_kernel(benchmark, record, scores, params):
    n = sum(s.numel() for s in scores)
    count = _run(benchmark, lambda: kernel_select_reset(scores, params), rounds=20)
    assert count == S.resolve_k(FRACTION, n)
    record("select_top1pct/kernel", benchmark, elements=n, bytes_moved=4 * n * 4)


def test_select_reset_kernel_histogram_route(benchmark, record, compare, scores, params):
    n = sum(s.numel() for s in scores)
    count = _run(benchmark, lambda: kernel_histogram_route_reset(scores, params), rounds=20)
    assert count == S.resolve_k(FRACTION, n)
    record("select_top1pct/kernel_histogram_route", benchmark, elements=n)
    compare("select_top1pct/fused vs histogram route", "select_top1pct/kernel",
            "select_top1pct/kernel_histogram_route")


def test_random_k_reset_kernel(benchmark, record, scores, params):
    n = sum(s.numel() for s in scores)
    count = _run(benchmark, lambda: kernel_random_k_reset(scores, params), rounds=20)
    assert count == S.resolve_k(FRACTION, n)
    record("select_top1pct/random_k_kernel", benchmark, elements=n)


def test_select_reset_topk(benchmark, record, compare, scores, params):
    n = sum(s.numel() for s in scores)
    _run(benchmark, lambda: topk_select_reset(scores, params), rounds=5)
    record("select_top1pct/torch_topk", benchmark, elements=n)
    compare("select_top1pct/kernel vs torch.topk (target >= 25x)", "select_top1pct/kernel",
            "select_top1pct/torch_topk")


def test_select_reset_double_argsort(benchmark, record, compare, scores, params):
    n = sum(s.numel() for s in scores)
    _run(benchmark, lambda: double_argsort_select_reset(scores, params), rounds=3)
    record("select_top1pct/double_argsort", benchmark, elements=n)
    compare("select_top1pct/kernel vs double argsort (target >= 200x)", "select_top1pct/kernel",
            "select_top1pct/double_argsort")


def test_same_selection(scores):
    """The kernel's selection is torch.topk's set (no ties in continuous gradients)."""
    a = [torch.ones_like(s) for s in scores]
    b = [torch.ones_like(s) for s in scores]
    kernel_select_reset(scores, a)
    topk_select_reset(scores, b)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
