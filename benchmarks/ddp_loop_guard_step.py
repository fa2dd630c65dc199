"""Per-step wall time of the README's DDP user loop on 2 gloo ranks of this machine, for the
unlearn_ext on PYTHONPATH: what the loop guard's per-step agreement (one int64 per rank) costs
against the step itself, whose backward all-reduces the gradients. Prints, for rank 0, the median
optimizer.step() call (where the guard's hooks run) and the median whole step (zero_grad, forward,
backward with DDP's all-reduce, step), in microseconds, over the steps that record nothing
(Mini-Unlearning's anchor steps take a full-data gradient and are left out); then, for scale, the
median of a bare all_reduce of one int64, of one float32 tensor the size of the model's gradients
(what DDP's backward reduces, in one bucket here), and of the guard's `agree` alone, in lockstep.

    OMP_NUM_THREADS=1 PYTHONPATH=<checkout> python benchmarks/ddp_loop_guard_step.py [epochs]
"""
from __future__ import annotations

import datetime
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import unlearn_ext as ue
from unlearn_ext.distributed.group import agree


def rank_main(rank: int, world: int, store_path: str, epochs: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    g = torch.Generator().manual_seed(0)
    dataset = torch.utils.data.TensorDataset(torch.randn(256, 10, generator=g), torch.randint(0, 3, (256,), generator=g))
    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    loader = torch.utils.data.DataLoader(dataset, batch_size=64)
    engine = ue.UnlearningEngine()
    model, optimizer, loader = engine.make_unlearnable(model, optimizer, loader, method="mini", epochs=epochs,
                                                       loss_fn=loss_fn, anchors=2)
    anchors = {a * len(loader) for a in engine.run.recorder.anchor_epochs}
    steps, calls, t = [], [], 0
    for _ in range(epochs):
        for x, y in loader:
            began = time.perf_counter()
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            stepping = time.perf_counter()
            optimizer.step()
            done = time.perf_counter()
            if t not in anchors and t > 0:
                steps.append(done - began)
                calls.append(done - stepping)
            t += 1
    flag, grads = torch.zeros(1, dtype=torch.int64), torch.zeros(sum(p.numel() for p in model.parameters()))
    bare = {}
    for name, collective in (("flag", lambda: dist.all_reduce(flag)), ("grads", lambda: dist.all_reduce(grads)),
                             ("agree", lambda: agree(lambda: (), shared=()))):
        times = []
        for _ in range(200):
            began = time.perf_counter()
            collective()
            times.append(time.perf_counter() - began)
        bare[name] = statistics.median(times) * 1e6
    if rank == 0:
        with open(out, "w") as f:
            f.write(f"{statistics.median(calls) * 1e6:.0f} {statistics.median(steps) * 1e6:.0f} {len(steps)} "
                    f"{bare['flag']:.0f} {bare['grads']:.0f} {bare['agree']:.0f}\n")
    dist.barrier()  # (no rank leaves while the other is still in a collective)
    dist.destroy_process_group()


if __name__ == "__main__":
    epochs = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "out")
        try:
            mp.start_processes(rank_main, args=(2, os.path.join(d, "store"), epochs, out), nprocs=2,
                               start_method="spawn")
        except mp.ProcessExitedException as exc:  # (seen at exit, after the numbers: gloo's teardown)
            print(f"a rank died: {exc}")
        call_us, step_us, n, flag_us, grads_us, agree_us = open(out).read().split()
    print(f"optimizer.step() median {call_us} us, whole step median {step_us} us ({n} steps, rank 0); "
          f"bare all_reduce: 1 int64 {flag_us} us, the gradients' float32 {grads_us} us; agree {agree_us} us")
