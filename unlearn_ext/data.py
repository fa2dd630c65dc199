"""The batch schedule of PCMU training (DESIGN section 4).

Each epoch is a seeded permutation of the *original* sample ids cut into fixed batches of the
nominal size b (the last batch of an epoch may be shorter). Training "without F" uses the same
permutations and cuts with F's ids deleted inside their batches — never re-chunked — so step t of
the retrained run sees batch t minus F. A batch left empty makes no update.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ScheduledStep:
    step: int          # global step index t
    epoch: int
    position: int      # batch index inside the epoch
    ids: torch.Tensor  # int64 ids present in this batch (excluded ids already removed)


def as_ids(values, what: str = "ids") -> torch.Tensor:
    """Sample ids as a flat int64 tensor. Float or bool input is refused: casting would silently
    turn 1.5 into id 1 (and forget the wrong sample)."""
    t = torch.as_tensor(values)
    if t.numel() == 0:
        return torch.empty(0, dtype=torch.int64)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{what} must be integers, got {t.dtype}")
    return t.reshape(-1).to(torch.int64)


class BatchSchedule:
    """Fixed per-epoch permutations of `ids` cut into batches of `batch_size`."""

    def __init__(self, ids: torch.Tensor, batch_size: int, seed: int = 0):
        ids = as_ids(ids)
        if ids.numel() == 0:
            raise ValueError("the training set is empty: no ids to schedule")
        if torch.unique(ids).numel() != ids.numel():
            raise ValueError("sample ids must be unique")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.ids = ids
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.batches_per_epoch = math.ceil(ids.numel() / self.batch_size)
        self._cached = None  # (epoch, its permutation)

    def permutation(self, epoch: int) -> torch.Tensor:
        # numpy's SeedSequence mixes (seed, epoch) into independent streams; the permutation depends
        # only on these two numbers, never on the excluded ids. The last epoch's permutation is kept:
        # a training loop asks for every step of an epoch in turn.
        epoch = int(epoch)
        if self._cached is None or self._cached[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._cached = (epoch, self.ids[torch.from_numpy(rng.permutation(self.ids.numel()))])
        return self._cached[1]

    def step(self, t: int, exclude: torch.Tensor | None = None) -> ScheduledStep:
        epoch, position = divmod(int(t), self.batches_per_epoch)
        # A copy, so a caller changing its batch cannot change the cached permutation.
        batch = self.permutation(epoch)[position * self.batch_size:(position + 1) * self.batch_size].clone()
        if exclude is not None and exclude.numel():
            batch = batch[~torch.isin(batch, exclude)]
        return ScheduledStep(int(t), epoch, position, batch)

    def steps(self, begin: int, end: int, exclude: torch.Tensor | None = None):
        """Steps begin..end-1."""
        for t in range(begin, end):
            yield self.step(t, exclude)
