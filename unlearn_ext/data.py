"""Training data, the batch schedule and retraining: what every method and test shares.

`TrainingData` holds the tensors, one stable integer id per row and the per-sample loss.
`BatchSchedule` (DESIGN section 4): each epoch is a seeded permutation of the *original* sample ids cut into fixed batches of the
nominal size b (the last batch of an epoch may be shorter). Training "without F" uses the same
permutations and cuts with F's ids deleted inside their batches — never re-chunked — so step t of
the retrained run sees batch t minus F. A batch left empty makes no update.
`train_sgd` is the ordinary SGD loop over that schedule, and `retrain` is the gold standard every
method is compared with: the same loop from the same initial weights, without the forgotten ids.
"""
from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch.utils.data import default_collate

from .loading import ScheduleSampler, TensorItems, check_map_style, collate_pairs


@dataclass(frozen=True)
class ScheduledStep:
    step: int          # global step index t
    epoch: int
    position: int      # batch index inside the epoch
    ids: torch.Tensor  # int64 ids present in this batch (excluded ids already removed)


def as_ids(values, what: str = "ids") -> torch.Tensor:
    """Sample ids as a flat int64 tensor. Float or bool input is refused: casting would silently
    turn 1.5 into id 1 (and forget the wrong sample); so are unsigned ids >= 2^63, which int64
    would turn negative (another id)."""
    if isinstance(values, np.ndarray) and values.dtype == np.uint64 and values.size and values.max() >= 2**63:
        raise ValueError(f"{what} must be below 2^63 (int64), got {int(values.max())}")
    try:
        t = torch.as_tensor(values)
    except (OverflowError, RuntimeError, ValueError) as exc:  # Python ints beyond int64
        raise ValueError(f"{what} must be integers in the int64 range: {exc}") from None
    if t.numel() == 0:
        return torch.empty(0, dtype=torch.int64)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{what} must be integers, got {t.dtype}")
    if t.dtype == torch.uint64 and any(int(v) >= 2**63 for v in t.reshape(-1).tolist()):
        raise ValueError(f"{what} must be below 2^63 (int64)")
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


# ---- training data ----------------------------------------------------------------------------------

def per_sample_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The default per-sample loss: cross-entropy per row (reduction 'none')."""
    return torch.nn.functional.cross_entropy(outputs, targets, reduction="none")


def tensors_sha256(tensors) -> str:
    """sha256 of a sequence of tensors' dtypes, shapes and values (in order, as stored): what a
    fingerprint records for data or weights whose content decides a result."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(f"{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class TrainingData:
    """A training set with stable ids: item r is sample `ids[r]`.

    Two forms, the same interface:
      * in memory (the fast path): `TrainingData(inputs, targets)`, row r of the tensors is item r;
      * the user's map-style dataset: `TrainingData(dataset)`, items (input, target) pairs loaded in
        batches (`collate`, default torch's default_collate), never all at once.

    loss(outputs, targets) must return one loss per row (shape [b]); batch losses are the mean (or
    sum) of those, so every method uses the same per-sample loss. Ids default to 0..n-1 (the item's
    index) or are given (e.g. database keys) and must be unique integers; they are what deletion
    requests name.
    """

    def __init__(self, inputs, targets: torch.Tensor | None = None, ids=None,
                 loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = per_sample_cross_entropy,
                 collate: Callable = default_collate):
        if targets is None:
            if isinstance(inputs, torch.Tensor):
                raise TypeError("in-memory data needs both inputs and targets: TrainingData(inputs, targets)")
            check_map_style(inputs)
            self.inputs = self.targets = None
            self.items, n = inputs, len(inputs)
        else:
            if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
                raise TypeError("TrainingData(inputs, targets) takes two tensors; a dataset is passed alone: "
                                "TrainingData(dataset)")
            if inputs.shape[0] != targets.shape[0]:
                raise ValueError(f"inputs have {inputs.shape[0]} rows but targets have {targets.shape[0]}")
            self.inputs, self.targets = inputs, targets
            self.items, n = TensorItems(inputs, targets), int(inputs.shape[0])
        if n == 0:
            raise ValueError("the training set is empty")
        self.loss, self.collate = loss, collate
        self.ids = torch.arange(n) if ids is None else as_ids(ids)
        if self.ids.numel() != n:
            raise ValueError(f"ids has {self.ids.numel()} entries for {n} samples")
        if torch.unique(self.ids).numel() != self.ids.numel():
            raise ValueError("sample ids must be unique")
        self._sorted_ids, self._rows = self.ids.sort()

    @property
    def in_memory(self) -> bool:
        return self.inputs is not None

    def __len__(self) -> int:
        return int(self.ids.numel())

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Row numbers (dataset indices) of known sample ids (check unknown_ids first)."""
        return self._rows[torch.searchsorted(self._sorted_ids, as_ids(ids))]

    def unknown_ids(self, ids) -> torch.Tensor:
        """The ids (in request order, repeats kept) that name no sample of this set."""
        ids = as_ids(ids)
        return ids[~torch.isin(ids, self.ids)]

    def batch(self, ids) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of the samples `ids`, in that order."""
        rows = self.rows(ids)
        if self.in_memory:
            return self.inputs[rows], self.targets[rows]
        return collate_pairs([self.items[r] for r in rows.tolist()], self.collate)

    def chunks(self, ids=None, size: int = 1024):
        """(ids, inputs, targets) of `ids` (default: every sample, in row order) in batches of at most
        `size`: what passes over the whole set use, so memory stays bounded by one batch."""
        ids = self.ids if ids is None else as_ids(ids)
        for lo in range(0, ids.numel(), size):
            part = ids[lo:lo + size]
            yield (part, *self.batch(part))

    def without(self, ids) -> torch.Tensor:
        """The ids of every sample not in `ids`, in row order."""
        return self.ids[~torch.isin(self.ids, as_ids(ids))]

    def sampler(self, schedule: BatchSchedule, exclude=None, first_epoch: int = 0) -> ScheduleSampler:
        """A batch sampler for a DataLoader over `self.items` yielding `schedule`'s batches."""
        excluded = None if exclude is None else as_ids(exclude)
        return ScheduleSampler(schedule, self.rows, excluded, first_epoch)

    def digest(self) -> str:
        """sha256 of the ids, inputs and targets (item by item, as stored): two sets with the same
        shapes but other values or another order differ. Computed once (in memory ~0.5 s per GB; a
        dataset is read once, in batches)."""
        if getattr(self, "_digest", None) is None:
            if self.in_memory:
                self._digest = tensors_sha256((self.ids, self.inputs, self.targets))
            else:
                h = hashlib.sha256(tensors_sha256([self.ids]).encode())
                for _, x, y in self.chunks():
                    h.update(tensors_sha256((x, y)).encode())
                self._digest = h.hexdigest()
        return self._digest

    def input_shape(self) -> list:
        if self.in_memory:
            return list(self.inputs.shape[1:])
        x, _ = self.batch(self.ids[:1])
        return list(x.shape[1:])

    def fingerprint(self) -> dict:
        """What identifies this set for saved state: size, feature shape and a content digest."""
        return {"samples": len(self), "input_shape": self.input_shape(), "data_sha256": self.digest()}


# ---- plain SGD training and retraining ------------------------------------------------------------

@dataclass(frozen=True)
class SGDConfig:
    """An ordinary SGD run over the fixed batch schedule. lr: a float or a function of the step."""
    epochs: int
    batch_size: int
    lr: float | Callable[[int], float]
    weight_decay: float = 0.0
    seed: int = 0

    def lr_at(self, t: int) -> float:
        return float(self.lr(t)) if callable(self.lr) else float(self.lr)

    def steps(self, n: int) -> int:
        return self.epochs * math.ceil(n / self.batch_size)

    # ---- the recipe interface (recipe.py): every method trains, retrains and repairs through it --

    def train(self, model: torch.nn.Module, data: "TrainingData", *, exclude=None,
              on_step: Callable | None = None) -> torch.nn.Module:
        return train_sgd(model, data, self, exclude=exclude, on_step=on_step)

    def peak_lr(self, n: int) -> float:
        return max(self.lr_at(t) for t in range(self.steps(n)))

    def tuned(self, lr_factor: float, epochs: int, seed: int, n: int) -> "SGDConfig":
        """The short run fine-tuning and repairs use: `epochs` passes at lr_factor x the schedule's
        peak learning rate (constant), the same batch size and weight decay, another batch order."""
        return SGDConfig(epochs=epochs, batch_size=self.batch_size, lr=lr_factor * self.peak_lr(n),
                         weight_decay=self.weight_decay, seed=seed)

    def fingerprint(self) -> dict:
        return {"optimizer": "plain SGD", "epochs": self.epochs, "batch_size": self.batch_size, "seed": self.seed,
                "weight_decay": self.weight_decay}


def sgd_step(model: torch.nn.Module, data: TrainingData, ids: torch.Tensor, lr: float,
             weight_decay: float) -> None:
    """One step of w <- w - lr * (mean per-sample loss gradient over the present ids + wd * w).
    The mean is over the samples present (a batch with forgotten ids removed averages the rest),
    which is what retraining on the retained set does; an empty batch makes no update."""
    if ids.numel() == 0:
        return
    x, y = data.batch(ids)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(data.loss(model(x), y).mean(), params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            if weight_decay:
                g = g + weight_decay * p
            p.sub_(lr * g)


def train_sgd(model: torch.nn.Module, data: TrainingData, config: SGDConfig, *, exclude=None,
              on_step: Callable | None = None) -> torch.nn.Module:
    """Trains `model` in place with plain SGD over the schedule of `config` minus `exclude`.

    on_step(t, ids, model) runs before step t's update (e.g. to record history). Plain gradient
    steps (no momentum) are what the history methods' linear response assumes (DESIGN section 6).
    """
    schedule = BatchSchedule(data.ids, config.batch_size, config.seed)
    excluded = as_ids([] if exclude is None else exclude)
    for step in schedule.steps(0, config.steps(len(data)), excluded):
        if on_step is not None:
            on_step(step.step, step.ids, model)
        sgd_step(model, data, step.ids, config.lr_at(step.step), config.weight_decay)
    return model


def retrain(initial: torch.nn.Module, data: TrainingData, recipe, forgotten) -> torch.nn.Module:
    """The gold standard: a copy of the initial model trained from scratch with the same recipe
    (SGDConfig or the user's OptimizerRecipe), seed and batch order, the forgotten ids deleted
    inside their batches. `initial` is not changed."""
    return recipe.train(copy.deepcopy(initial), data, exclude=forgotten)


def retrain_cost(data: TrainingData, config: SGDConfig, forgotten) -> int:
    """Sample-gradient evaluations retraining without `forgotten` costs (the unit of every report's
    cost): each retained sample once per epoch."""
    kept = len(data) - int(torch.isin(data.ids, as_ids(forgotten)).sum())
    return config.epochs * kept
