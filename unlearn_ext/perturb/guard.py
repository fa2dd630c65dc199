"""The retained-accuracy guard of Top-K / Random-k (our formulation).

A fixed K that suits one network can wreck another: resetting 5% of a small CNN's coordinates
chosen by their gradient on F and repairing for one epoch took its test accuracy from 0.95 to 0.56,
because the largest gradients sit in a few layers that hold what R needs too. The guard checks each
answer against what the model did on the retained data before the request: on a seeded slice S of
R (at most `size` samples, drawn per request), accuracy after perturbation and repair must be at
most `tolerance` below the accuracy before it. If it is not, the request is answered again from the
weights before the request with K halved, at most `halvings` times; the last answer is kept either
way and the report says whether the guard was met.

S stays in the repair (it is retained data: retraining fits it too), so the guard reads the loss of
what the model knew about R, not generalization; on a model that generalizes the two move
together. Cost: one forward pass over S before the request and one per answer, counted as one
sample gradient per sample, plus every retried answer's full cost.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..metrics import outputs


def check_options(tolerance, size, halvings) -> None:
    """Refuses guard options no request could use, naming the option."""
    if tolerance is None:
        return
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and 0 <= tolerance < 1):
        raise ValueError(f"guard (the largest retained-accuracy drop allowed) must be a number in [0, 1), "
                         f"got {tolerance!r}")
    if not (isinstance(size, int) and size >= 1):
        raise ValueError(f"guard_size (samples of R the guard reads) must be an integer >= 1, got {size!r}")
    if not (isinstance(halvings, int) and halvings >= 0):
        raise ValueError(f"guard_halvings (how often K may be halved) must be an integer >= 0, got {halvings!r}")


def guard_slice(retained: torch.Tensor, size: int, seed: int, request: int) -> torch.Tensor:
    """A seeded sample of at most `size` ids of R, drawn from (seed, request number)."""
    if retained.numel() <= size:
        return retained
    rng = np.random.default_rng([int(seed), int(request), 61])
    return retained[torch.from_numpy(rng.choice(retained.numel(), size, replace=False))].sort().values


def slice_accuracy(model: torch.nn.Module, data, ids: torch.Tensor) -> float:
    """Accuracy on the ids, in eval mode (the probe must not move BatchNorm's running statistics)."""
    if data.in_memory:
        x, y = data.batch(ids)
        with torch.no_grad():
            return float((outputs(model, x).argmax(1) == y).double().mean())
    hits = 0
    for start in range(0, ids.numel(), 1024):
        x, y = data.batch(ids[start:start + 1024])
        with torch.no_grad():
            hits += int((outputs(model, x).argmax(1) == y).sum())
    return hits / max(1, ids.numel())


def halved(k):
    """The next K to try: half a fraction; half a count, at least 1."""
    if isinstance(k, float):
        return k / 2
    return max(1, int(k) // 2)
