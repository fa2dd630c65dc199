"""Exact retraining from stored weights: the safety fallback of both history methods.

Replays plain SGD without the forgotten ids from a recorded step `start` to the end, with the
recorded schedule (batch seed and size, or the recorded batch ids), learning rates and weight
decay. From step 0 (the initial weights) this is exactly `retrain`.
"""
from __future__ import annotations

import torch

from ..data import BatchSchedule, TrainingData, sgd_step


def resume_from(model, data: TrainingData, run_info: dict, start: int, weights: torch.Tensor, flat,
                exclude: torch.Tensor, batches=None) -> int:
    """Loads `weights` (flat) into `model` and trains steps start..T-1 without `exclude`. batches:
    optional {step: recorded batch ids}; otherwise the BatchSchedule of run_info. Returns the
    sample-gradient cost (retained samples seen)."""
    lrs = run_info["lr_schedule"]
    wd = float(run_info.get("weight_decay", 0.0) or 0.0)
    flat.load_(weights)
    cost = 0
    if batches is None:
        schedule = BatchSchedule(data.ids, run_info["batch_size"], run_info["batch_seed"])
        steps = ((s.step, s.ids) for s in schedule.steps(start, len(lrs), exclude))
    else:
        steps = ((t, ids[~torch.isin(ids, exclude)]) for t, ids in sorted(batches.items()) if t >= start)
    for t, ids in steps:
        sgd_step(model, data, ids, lrs[t], wd)
        cost += int(ids.numel())
    return cost
