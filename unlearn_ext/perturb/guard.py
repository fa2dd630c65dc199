"""The accuracy guard of Top-K / Random-k (our formulation).

A fixed K that suits one network can wreck another: resetting 5% of a small CNN's coordinates
chosen by their gradient on F and repairing for one epoch took its test accuracy from 0.95 to 0.56,
because the largest gradients sit in a few layers that hold what R needs too. The guard checks each
answer against what the model did before the request, on one of two probes:

* held-out data (`guard_data=(x, y)`, the user's validation set, never trained on): accuracy after
  perturbation and repair must be at most `tolerance` below the original model's accuracy on the
  same data (measured once, at the first guarded request, and kept). This is the probe that sees a
  loss of generalization.
* without held-out data, a seeded slice S of R (at most `size` samples, drawn per request),
  compared with the accuracy on S just before the request. S stays in the repair (it is retained
  data: retraining fits it too), so this probe reads what the model knew about R, not
  generalization.

When the answer fails, the guard first repairs further with the repair's own recipe (`rounds`
rounds of `repair_epochs` more epochs each, re-checking after each), then halves K and answers
again from the weights before the request (at most `halvings` times), and so on. It never starts a
step whose cost would take the request past `budget` x retraining's sample gradients (default 1.0:
never more than retraining would cost; None: no cost cap, only the counts). The last answer is kept
either way; the report says what the guard did and why it stopped. Cost: one forward pass over the probe per check (and over S or the held-out data
once before), counted as one sample gradient per sample, plus every repair round and retried answer.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..forward import outputs


def check_options(tolerance, size, halvings, rounds=0, budget=None, data=None) -> None:
    """Refuses guard options no request could use, naming the option."""
    if tolerance is None:
        return
    if not (isinstance(tolerance, (int, float)) and not isinstance(tolerance, bool) and math.isfinite(tolerance)
            and 0 <= tolerance < 1):
        raise ValueError(f"guard (the largest accuracy drop allowed) must be a number in [0, 1), got {tolerance!r}")
    if not (isinstance(size, int) and size >= 1):
        raise ValueError(f"guard_size (samples of R the guard reads) must be an integer >= 1, got {size!r}")
    if not (isinstance(halvings, int) and halvings >= 0):
        raise ValueError(f"guard_halvings (how often K may be halved) must be an integer >= 0, got {halvings!r}")
    if not (isinstance(rounds, int) and not isinstance(rounds, bool) and rounds >= 0):
        raise ValueError(f"guard_rounds (further repair rounds before K is halved) must be an integer >= 0, "
                         f"got {rounds!r}")
    if budget is not None and not (isinstance(budget, (int, float)) and not isinstance(budget, bool)
                                   and math.isfinite(budget) and budget > 0):
        raise ValueError(f"guard_budget (the request's cost cap, a multiple of retraining's) must be a finite "
                         f"number > 0 or None, got {budget!r}")
    if data is not None:
        if not (isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)):
            raise ValueError("guard_data (the held-out data the guard reads) must be a pair of tensors (x, y)")
        x, y = data
        if x.shape[0] == 0 or x.shape[0] != y.shape[0]:
            raise ValueError(f"guard_data must hold at least one sample and as many labels as inputs, got "
                             f"{x.shape[0]} input(s) and {y.shape[0]} label(s)")


def guard_slice(retained: torch.Tensor, size: int, seed: int, request: int) -> torch.Tensor:
    """A seeded sample of at most `size` ids of R, drawn from (seed, request number)."""
    if retained.numel() <= size:
        return retained
    rng = np.random.default_rng([int(seed), int(request), 61])
    return retained[torch.from_numpy(rng.choice(retained.numel(), size, replace=False))].sort().values


def _hits(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
    """(correct, counted): per sample for (batch, classes) outputs; per target token for per-position
    outputs, skipping the padded positions (negative targets)."""
    predicted = outputs(model, x).argmax(-1)
    valid = y >= 0
    return int((predicted == y)[valid].sum()), int(valid.sum())


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 1024) -> float:
    """Accuracy on (x, y), in eval mode (the probe must not move BatchNorm's running statistics)."""
    hits = counted = 0
    for start in range(0, x.shape[0], chunk):
        h, c = _hits(model, x[start:start + chunk], y[start:start + chunk])
        hits, counted = hits + h, counted + c
    return hits / max(1, counted)


def slice_accuracy(model: torch.nn.Module, data, ids: torch.Tensor) -> float:
    """Accuracy on the training rows `ids`."""
    hits = counted = 0
    for start in range(0, ids.numel(), 1024):
        h, c = _hits(model, *data.batch(ids[start:start + 1024]))
        hits, counted = hits + h, counted + c
    return hits / max(1, counted)


def halved(k):
    """The next K to try: half a fraction; half a count, at least 1."""
    if isinstance(k, float):
        return k / 2
    return max(1, int(k) // 2)
