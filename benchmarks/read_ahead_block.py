"""CPU time of DeltaGrad's read-ahead of the recorded weights and gradients alone
(DeltaGradUnlearner._recorded over every recorded step, each step's gradient added into one vector),
on a 64-1024-32 tanh MLP (99,360 parameters: a size whose block the read-ahead's memory bound
limits below 64 steps), 152 recorded steps of the default history codecs. Prints the block size,
the minimum and all repetitions' process CPU times, and a checksum of the accumulated gradients
(equal across checkouts: the read-ahead changes no bit).

    OMP_NUM_THREADS=1 PYTHONPATH=<checkout> python benchmarks/read_ahead_block.py [--repeats 7]
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

import unlearn_ext as ue
from unlearn_ext.mini import deltagrad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    repeats = parser.parse_args().repeats
    torch.manual_seed(0)
    n, d = 600, 64
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 32, (n,), generator=g)
    x = torch.randn(n, d, generator=g) + 2 * nn.functional.one_hot(y, d).float()
    data = ue.TrainingData(x, y)
    model = nn.Sequential(nn.Linear(d, 1024), nn.Tanh(), nn.Linear(1024, 32))
    store = ue.step_store(model)
    ue.train_recording_steps(model, data, ue.SGDConfig(epochs=8, batch_size=32, lr=0.01), store)
    times = []
    for _ in range(repeats):
        unlearner = ue.DeltaGradUnlearner(copy.deepcopy(model), data, store)
        total = torch.zeros(unlearner.flat.dim)
        began = time.process_time()
        for _, add_g in unlearner._recorded(list(store.steps)):
            add_g(total, 0.1)
        times.append(time.process_time() - began)
    dim = unlearner.flat.dim
    block = (deltagrad.read_ahead_block(dim) if hasattr(deltagrad, "read_ahead_block")  # (main: the old rule)
             else max(1, min(deltagrad.READ_AHEAD_STEPS, deltagrad.READ_AHEAD_BYTES // (8 * dim))))
    print(f"parameters {dim}, steps {len(store.steps)}, block {block}: min {min(times):.4f} s CPU; "
          f"all {[round(t, 4) for t in times]}; checksum {float(total.double().sum())!r}")


if __name__ == "__main__":
    main()
