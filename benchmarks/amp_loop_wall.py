"""Wall time of a user loop with declared clipping, plain or in torch.amp's recipe (GradScaler,
unscale_, clip_grad_norm_, scaler.step, update; no autocast, float32), for the unlearn_ext on
PYTHONPATH: what the loop guard's clip check costs with and without a declared GradScaler (which
adds two get_scale() per step and unscales the kept copies). Prints the seconds of the whole run
(make_unlearnable, 4 epochs, unlearner()).

    OMP_NUM_THREADS=1 PYTHONPATH=<checkout> python benchmarks/amp_loop_wall.py {clip|amp} [n]
"""
from __future__ import annotations

import sys
import time

import torch
from torch import nn

import unlearn_ext as ue
from user_loop_wall import MyImages  # the README's dataset (run from benchmarks/: its folder is on the path)

EPOCHS, MAX_NORM = 4, 1.0


def main(mode: str = "clip", n: int = 960) -> float:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 8 * 8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = nn.CrossEntropyLoss()
    loader = torch.utils.data.DataLoader(MyImages(n), batch_size=32, shuffle=True)
    scaler = torch.amp.GradScaler("cpu", enabled=mode == "amp")  # disabled: every call is a no-op
    start = time.perf_counter()
    engine = ue.UnlearningEngine()
    model, optimizer, loader = engine.make_unlearnable(
        model, optimizer, loader, method="retrain", epochs=EPOCHS, loss_fn=loss_fn, seed=0, clip_grad_norm=MAX_NORM,
        **({"grad_scaler": scaler} if mode == "amp" else {}))
    for _ in range(EPOCHS):
        for x, y in loader:
            optimizer.zero_grad()
            scaler.scale(loss_fn(model(x), y)).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
            scaler.step(optimizer)
            scaler.update()
    engine.unlearner()
    return time.perf_counter() - start


if __name__ == "__main__":
    print(f"{main(sys.argv[1] if len(sys.argv) > 1 else 'clip', int(sys.argv[2]) if len(sys.argv) > 2 else 960):.4f}")
