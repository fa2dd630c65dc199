"""The first exchange of an agreement with no values (group.agree with shared=() and local=(), as
the loop guard makes at every optimizer step under DDP), 2 gloo ranks of this machine: a row per
rank (every_ranks_row, read back as the acceptance column) against the count of refusing ranks
(group._any_refused). Interleaved in blocks of 100 calls, 10 blocks each; prints rank 0's medians
in microseconds.

    OMP_NUM_THREADS=1 PYTHONPATH=<checkout> python benchmarks/agree_exchange.py
"""
from __future__ import annotations

import datetime
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from unlearn_ext.distributed.group import _any_refused, every_ranks_row


def rank_main(rank: int, world: int, store_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    group = dist.group.WORLD
    exchanges = {"a row per rank": lambda: every_ranks_row(torch.ones(1, dtype=torch.int64), group)[:, 0].tolist(),
                 "a count": lambda: _any_refused(None, group)}
    times = {name: [] for name in exchanges}
    for _ in range(10):
        for name, exchange in exchanges.items():
            for _ in range(100):
                began = time.perf_counter()
                exchange()
                times[name].append(time.perf_counter() - began)
    if rank == 0:
        print(", ".join(f"{name} {statistics.median(t) * 1e6:.0f} us" for name, t in times.items()))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(rank_main, args=(2, os.path.join(d, "store")), nprocs=2, start_method="spawn")
