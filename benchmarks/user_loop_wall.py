"""Wall time of the README's user loop (make_unlearnable + 4 epochs of the user's own loop), for
the unlearn_ext on PYTHONPATH: what the loop guard's per-step checks (and the first step's
recomputation of retraining's gradient) cost a user's training run. Prints two numbers of seconds:
the whole run, and its first optimizer.step() call alone (where the recomputation runs).

    OMP_NUM_THREADS=1 PYTHONPATH=<checkout> python benchmarks/user_loop_wall.py [method] [n]
"""
from __future__ import annotations

import sys
import time

import torch
from torch import nn

import unlearn_ext as ue


class MyImages(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return torch.randn(1, 8, 8, generator=g) + i % 3, i % 3


def main(method: str = "retrain", n: int = 240) -> tuple[float, float]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 8 * 8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = nn.CrossEntropyLoss()
    loader = torch.utils.data.DataLoader(MyImages(n), batch_size=32, shuffle=True)
    start = time.perf_counter()
    engine = ue.UnlearningEngine()
    model, optimizer, loader = engine.make_unlearnable(model, optimizer, loader, method=method, epochs=4,
                                                       loss_fn=loss_fn, seed=0)
    first = None
    for _ in range(4):
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            before = time.perf_counter()
            optimizer.step()
            first = time.perf_counter() - before if first is None else first
    engine.unlearner()
    return time.perf_counter() - start, first


if __name__ == "__main__":
    total, first = main(sys.argv[1] if len(sys.argv) > 1 else "retrain", int(sys.argv[2]) if len(sys.argv) > 2 else 240)
    print(f"{total:.4f} {first:.4f}")
