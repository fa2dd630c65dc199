"""PCMU step time with each batch's per-sample gradients split across 2 gloo ranks
(unlearn_ext.distributed.DistributedPCMUTrainer) against one process, same run (docs/design.md §9,
§12). Workload: test_bench_pcmu.py's benchmark MLP 64-256-256-10 (85k parameters) on digits, batch
256, `analytic` smoothing. Reported: the median step time at 1 process x 1 thread, 1 process x 2
threads and 2 ranks x 1 thread, their ratios, and the bytes each rank receives per step (the other
ranks' float64 clipped sums, gathered so that every rank adds them in rank order).

Timing: wall clock around `step` on rank 0 after a barrier (so a round waits for the slower rank),
the median of the steps after WARMUP; every configuration takes the same scheduled batches. On a
machine whose cores are shared with other work the 2-rank figure is the most sensitive to it.

Run (it uses the `note` fixture, so not with --benchmark-only):
    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python -m pytest -q -s -p no:cacheprovider benchmarks/test_bench_dist_pcmu.py
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from unlearn_ext.distributed import DistributedPCMUTrainer
from unlearn_ext.evaluate.pcmu_examples import load
from unlearn_ext.pcmu import PCMUTrainer

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from distributed_setup import launch  # noqa: E402  (the test suite's rank launcher)

B, WARMUP, STEPS = 256, 2, 10
OPTIONS = dict(batch_size=B, clip_norm=1.0, lr=0.01, tau=0.006, sigma=0.01, mode="analytic", max_request=2)


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 256),
                               torch.nn.Tanh(), torch.nn.Linear(256, 10))


def _median_step(trainer) -> float:
    times = []
    for i, ids in enumerate(trainer.batches(epochs=3)):
        if i == WARMUP + STEPS:
            break
        if dist.is_initialized():
            dist.barrier()
        began = time.perf_counter()
        trainer.step(ids)
        if i >= WARMUP:
            times.append(time.perf_counter() - began)
    return statistics.median(times)


def distributed_worker(rank, world):
    x, y, _, _ = load("digits")
    trainer = DistributedPCMUTrainer(_mlp(), torch.nn.functional.cross_entropy, (x, y), **OPTIONS)
    return _median_step(trainer), trainer.coordinates


def test_distributed_pcmu_step_time(note):
    x, y, _, _ = load("digits")
    threads = torch.get_num_threads()
    single = {}
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            single[count] = _median_step(PCMUTrainer(_mlp(), torch.nn.functional.cross_entropy, (x, y), **OPTIONS))
    finally:
        torch.set_num_threads(threads)
    two_ranks, coordinates = launch(distributed_worker, 2, 300)[0]
    note("dist_pcmu/seconds_1_process_1_thread", single[1])
    note("dist_pcmu/seconds_1_process_2_threads", single[2])
    note("dist_pcmu/seconds_2_ranks_x_1_thread", two_ranks)
    note("dist_pcmu/ratio_1_process_1_thread_over_2_ranks", single[1] / two_ranks)
    note("dist_pcmu/ratio_1_process_2_threads_over_2_ranks", single[2] / two_ranks)
    note("dist_pcmu/bytes_received_per_rank_per_step", coordinates * 8)  # the other rank's float64 sums
    note("dist_pcmu/parameters", coordinates)
