"""Distributed exact Top-K (unlearn_ext.distributed.selection) on ResNet-18's 11.7M fp32 scores
split between 2 gloo ranks on this machine, against the single-process select of the same total in
the same run (docs/design.md §9, §12). Reported:
* communication per select: the all-reduced histogram bytes (+ the tie exchange), against what
  all-gathering the scores would move (every rank receives the others' scores, 4 bytes each);
* median wall time of a resolved select (threshold and boundary known: the route a sharded caller
  takes) at 2 ranks x 1 thread, against one process at 1 thread and at 2 threads (ratios, same run).
Timing is wall clock around the call on rank 0 after a barrier, 5 rounds after 1 warm-up.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from unlearn_ext import distributed as D
from unlearn_ext import selection as S
from workloads import gradient_list

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from distributed_setup import launch  # noqa: E402  (the test suite's rank launcher)

FRACTION, ROUNDS = 0.01, 5


def _halves(world: int, rank: int) -> list[torch.Tensor]:
    """Rank r's tensors: a contiguous run of the 62 tensors, about 1/world of the elements each."""
    scores = gradient_list(scale=1e-2, seed=1)
    total = sum(t.numel() for t in scores)
    out, seen = [], 0
    for t in scores:
        if rank * total // world <= seen < (rank + 1) * total // world:
            out.append(t)
        seen += t.numel()
    return out


def _timed(fn) -> float:
    times = []
    for i in range(ROUNDS + 1):
        if dist.is_initialized():
            dist.barrier()
        began = time.perf_counter()
        fn()
        if i:  # the first round warms up
            times.append(time.perf_counter() - began)
    return statistics.median(times)


def distributed_worker(rank, world):
    local = _halves(world, rank)

    def select():
        sel = D.topk(local, FRACTION)
        return sel.threshold, sel.boundary
    return _timed(select)


def test_distributed_select_traffic_and_time(note):
    scores = gradient_list(scale=1e-2, seed=1)
    total = sum(t.numel() for t in scores)
    histogram_bytes = sum(D.histogram_bytes_per_pass("cpu")) + 2 * 8 + 8  # + tie exchange (2 ranks)
    gather_bytes = total * 4 // 2  # each rank receives the other half of the fp32 scores
    note("dist_select/histogram_bytes_per_rank", histogram_bytes)
    note("dist_select/all_gather_bytes_per_rank", gather_bytes)
    note("dist_select/traffic_ratio_gather_vs_histogram", gather_bytes / histogram_bytes)

    def single():
        sel = S.topk(scores, FRACTION)
        return sel.threshold, sel.boundary
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = _timed(single)
        torch.set_num_threads(2)
        two_threads = _timed(single)
    finally:
        torch.set_num_threads(threads)
    two_ranks = launch(distributed_worker, 2, 300)[0]
    note("dist_select/seconds_2_ranks_x_1_thread", two_ranks)
    note("dist_select/seconds_1_process_1_thread", one_thread)
    note("dist_select/seconds_1_process_2_threads", two_threads)
    note("dist_select/ratio_1_process_1_thread_over_2_ranks", one_thread / two_ranks)
    note("dist_select/ratio_1_process_2_threads_over_2_ranks", two_threads / two_ranks)
    note("dist_select/elements", total)
