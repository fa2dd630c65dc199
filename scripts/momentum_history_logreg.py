"""The history methods with and without momentum on the harness's history-logreg setting
(digits-pixels, weight decay 1e-3, 40 epochs, batch 128), seed 0, a seeded 10% forgotten: plain SGD
at lr 0.5 against momentum 0.9 (heavy ball, Nesterov) at lr 0.05 (the same effective step
lr / (1 - mu)); Mini and DeltaGrad with their defaults; d/d0 against each run's own retraining, and
wall times of the same process (Mini: median of 3).

    OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/momentum_history_logreg.py
"""
from __future__ import annotations

import copy
import dataclasses
import statistics
import time

import torch

import unlearn_ext as ue
from unlearn_ext.evaluate import settings
from unlearn_ext.mini.vectors import FlatModel

RUNS = (("plain", 0.0, False), ("heavy-ball", 0.9, False), ("nesterov", 0.9, True))


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    data, init, config = settings.get("history-logreg").training(0)
    forget = data.ids[torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:len(data) // 10]]

    def d_over_d0(model, original, w_retrained):
        w, w0 = FlatModel(model, data).flat(), FlatModel(original, data).flat()
        return float((w - w_retrained).norm() / (w0 - w_retrained).norm())

    for name, mu, nesterov in RUNS:
        run = dataclasses.replace(config, lr=config.lr * (1 - mu), momentum=mu, nesterov=nesterov)
        retrained, retrain_s = timed(lambda: ue.retrain(init, data, run, forget))
        w_retrained = FlatModel(retrained, data).flat()

        anchored = copy.deepcopy(init)
        anchors = ue.mini_store(anchored)
        ue.train_recording_anchors(anchored, data, run, anchors)
        times = []
        for _ in range(3):
            mini = copy.deepcopy(anchored)
            report, seconds = timed(lambda: ue.MiniUnlearner(mini, data, anchors).unlearn(forget))
            times.append(seconds)
        mini_s = statistics.median(times)

        stepped = copy.deepcopy(init)
        steps = ue.step_store(stepped)
        ue.train_recording_steps(stepped, data, run, steps)
        dg = copy.deepcopy(stepped)
        dg_report, dg_s = timed(lambda: ue.DeltaGradUnlearner(dg, data, steps).unlearn(forget))

        print(f"{name:10s} lr {run.lr:.3g}  retrain {retrain_s:.3f} s | mini {report.status} d/d0 "
              f"{d_over_d0(mini, anchored, w_retrained):.3f} {mini_s:.3f} s ({retrain_s / mini_s:.1f}x) | deltagrad "
              f"{dg_report.status} d/d0 {d_over_d0(dg, stepped, w_retrained):.3f} {dg_s:.3f} s")


if __name__ == "__main__":
    main()
