"""Exact retraining from stored weights: the safety fallback of both history methods.

Replays SGD without the forgotten ids from a recorded step `start` to the end, with the recorded
schedule (batch seed and size, or the recorded batch ids), learning rates, weight decay and
momentum. From step 0 (the initial weights) this is exactly `retrain`.

Momentum: a run with momentum carries the buffer b_t from step to step, so resuming at step t needs
the buffer the *retrained* run would hold there, not only its weights. At step 0 it is known (b_0 =
0: torch starts the buffer with the first gradient); at a later step it is as unknown as the
retrained weights themselves, and the recorded run's buffer is not it. So a momentum run resumes
from step 0 only (a later start would need a stored retained-run buffer, which no history holds).
"""
from __future__ import annotations

import torch

from ..data import BatchSchedule, TrainingData, momentum_optimizer, sgd_step
from .record import SGDSettings


def resume_from(model, data: TrainingData, run_info: dict, sgd: SGDSettings, start: int, weights: torch.Tensor,
                flat, exclude: torch.Tensor, batches=None, lrs=None) -> int:
    """Loads `weights` (flat) into `model` and trains steps start..T-1 without `exclude`, with the
    SGD settings `sgd` (check_replayable_sgd; momentum: torch.optim.SGD's own steps, from step 0
    only). batches: optional {step: recorded batch ids}; otherwise the BatchSchedule of run_info.
    lrs: optional {step: recorded learning rate}; otherwise run_info's lr_schedule.
    Returns the sample-gradient cost (retained samples seen)."""
    if sgd.momentum and start != 0:
        raise ValueError(f"resuming momentum SGD at step {start} needs the retrained run's momentum buffer there, "
                         "which no history stores; resume from step 0 (buffer 0)")
    lrs = run_info["lr_schedule"] if lrs is None else lrs
    flat.load_(weights)
    # A model with dropout trains in training mode here: its masks come from a generator seeded by
    # the run, so the answer does not depend on the process's RNG state, which is left alone.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(run_info.get("batch_seed", 0)))
        return _replay(model, data, run_info, sgd, start, exclude, batches, lrs)


def _replay(model, data, run_info, sgd, start, exclude, batches, lrs) -> int:
    optimizer = momentum_optimizer(model, sgd.momentum, sgd.nesterov, sgd.weight_decay)
    cost = 0
    if batches is None:
        schedule = BatchSchedule(data.ids, run_info["batch_size"], run_info["batch_seed"],
                                 run_info.get("batch_shuffle", True))
        steps = ((s.step, s.ids) for s in schedule.steps(start, len(lrs), exclude))
    else:
        steps = ((t, ids[~torch.isin(ids, exclude)]) for t, ids in sorted(batches.items()) if t >= start)
    for t, ids in steps:
        sgd_step(model, data, ids, lrs[t], sgd.weight_decay, optimizer)
        cost += int(ids.numel())
    return cost
