"""Training data, the batch schedule and retraining: what every method and test shares.

`TrainingData` holds the tensors, one stable integer id per row and the per-sample loss.
`BatchSchedule` (docs/design.md §4): each epoch is a seeded permutation of the *original* sample ids cut into fixed batches of the
nominal size b (the last batch of an epoch may be shorter). Training "without F" uses the same
permutations and cuts with F's ids deleted inside their batches — never re-chunked — so step t of
the retrained run sees batch t minus F. A batch left empty makes no update.
`train_sgd` is the ordinary SGD loop over that schedule, and `retrain` is the gold standard every
method is compared with: the same loop from the same initial weights, without the forgotten ids.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import math
import numbers
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch.utils.data import default_collate

from .loading import LoopSampler, ScheduleSampler, TensorItems, check_map_style, collate_pairs


@dataclass(frozen=True)
class ScheduledStep:
    step: int          # global step index t
    epoch: int
    position: int      # batch index inside the epoch
    ids: torch.Tensor  # int64 ids present in this batch (excluded ids already removed)


def as_ids(values, what: str = "ids") -> torch.Tensor:
    """Sample ids as a flat int64 tensor. Anything but integers is refused with a TypeError saying
    "<what> must be integers": floats (casting would silently turn 1.5 into id 1 and forget the wrong
    sample), bools (True would become id 1, also inside a list such as [5, True]), strings, None,
    and meta tensors (no values). Integers outside int64 (e.g. unsigned ids >= 2^63, which int64
    would turn negative: another id) are a ValueError naming the int64 range."""
    if isinstance(values, torch.Tensor):
        if values.is_meta:
            raise TypeError(f"{what} must be integers with values; got a meta tensor (it holds none)")
        return _int64_ids(values, what)
    if isinstance(values, np.ndarray) and values.dtype != object:
        return _int64_ids(_numpy_ids(values, what), what)
    if isinstance(values, np.ndarray):  # an object array: its elements, one by one
        values = values.reshape(-1).tolist()
    if isinstance(values, (bool, np.bool_)) or not isinstance(values, (list, tuple, numbers.Integral)):
        raise TypeError(f"{what} must be integers (a sequence of ints, an integer array or tensor), got "
                        f"{type(values).__name__} {values!r}"[:300])
    items = values if isinstance(values, (list, tuple)) else [values]
    flat = _check_integer_items(items, what)
    big = [v for v in flat if not -2**63 <= v < 2**63]
    if big:
        raise ValueError(f"{what} must be integers in the int64 range; got {big[0]}")
    return torch.tensor(flat, dtype=torch.int64)


def _check_integer_items(items, what: str) -> list:
    """The Python ints of a (nested) sequence, after refusing every element that is not an integer.
    Element by element: torch.as_tensor would read [5, True] as [5, 1]."""
    out = []
    for v in items:
        if isinstance(v, (list, tuple)):
            out.extend(_check_integer_items(v, what))
        elif isinstance(v, (torch.Tensor, np.ndarray)):
            out.extend(as_ids(v, what).tolist())
        elif isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{what} must be integers, got {type(v).__name__} {v!r}"[:300])
        else:
            out.append(int(v))
    return out


def in_sorted(values: torch.Tensor, sorted_values: torch.Tensor) -> torch.Tensor:
    """torch.isin(values, sorted_values) for a sorted `sorted_values`, by binary search: a few
    microseconds for a request's ids, where torch.isin costs 30-150 us at any size here."""
    if not sorted_values.numel():
        return torch.zeros(values.shape, dtype=torch.bool)
    at = torch.searchsorted(sorted_values, values).clamp_(max=sorted_values.numel() - 1)
    return sorted_values[at] == values


def _numpy_ids(values: np.ndarray, what: str) -> torch.Tensor:
    if values.dtype.kind not in "iu":
        raise TypeError(f"{what} must be integers, got a numpy array of {values.dtype}")
    if values.dtype == np.uint64 and values.size and values.max() >= 2**63:
        raise ValueError(f"{what} must be integers in the int64 range (below 2^63), got {int(values.max())}")
    return torch.from_numpy(values.astype(np.int64, copy=False).reshape(-1).copy())


def _int64_ids(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{what} must be integers, got {t.dtype}")
    if t.numel() == 0:
        return torch.empty(0, dtype=torch.int64)
    if t.dtype == torch.uint64 and any(int(v) >= 2**63 for v in t.reshape(-1).tolist()):
        raise ValueError(f"{what} must be integers in the int64 range (below 2^63)")
    return t.reshape(-1).to(torch.int64)


class BatchSchedule:
    """Fixed per-epoch permutations of `ids` cut into batches of `batch_size`. shuffle=False keeps
    the ids' own order in every epoch (a user's DataLoader with shuffle=False: its SequentialSampler
    is honoured, not replaced; `seed` then decides nothing)."""

    def __init__(self, ids: torch.Tensor, batch_size: int, seed: int = 0, shuffle: bool = True):
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
        self.shuffle = bool(shuffle)
        self.batches_per_epoch = math.ceil(ids.numel() / self.batch_size)
        self._cached = None  # (epoch, its permutation)
        self._batch_of = None  # [epochs, n]: batch (within its epoch) of each row; see batch_of_rows
        self._batch_of_epochs = 0

    def _row_order(self, epoch: int) -> np.ndarray:
        # numpy's SeedSequence mixes (seed, epoch) into independent streams; the permutation depends
        # only on these two numbers, never on the excluded ids.
        if not self.shuffle:
            return np.arange(self.ids.numel())
        return np.random.default_rng([self.seed, int(epoch)]).permutation(self.ids.numel())

    def permutation(self, epoch: int) -> torch.Tensor:
        # The last epoch's permutation is kept: a training loop asks for every step of an epoch in turn.
        epoch = int(epoch)
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, self.ids[torch.from_numpy(self._row_order(epoch))])
        return self._cached[1]

    def batch_of_rows(self, epochs: int) -> torch.Tensor:
        """[epochs, n] int16/int32: the batch of its epoch that holds each row (of `ids`), for epochs
        0..epochs-1. Built once per epoch and kept (2 bytes per sample and epoch while an epoch has
        fewer than 32768 batches), so finding the steps that hold some ids costs a gather instead
        of regenerating every epoch's permutation."""
        n, bpe = self.ids.numel(), self.batches_per_epoch
        dtype = torch.int16 if bpe <= 2**15 else torch.int32
        if self._batch_of is None or self._batch_of.shape[0] < epochs:
            grown = torch.empty(max(epochs, 2 * self._batch_of_epochs, 8), n, dtype=dtype)
            if self._batch_of is not None:
                grown[:self._batch_of_epochs] = self._batch_of[:self._batch_of_epochs]
            self._batch_of = grown
        for e in range(self._batch_of_epochs, epochs):
            position = np.empty(n, dtype=np.int64)
            position[self._row_order(e)] = np.arange(n)
            self._batch_of[e] = torch.from_numpy(position // self.batch_size)
        self._batch_of_epochs = max(self._batch_of_epochs, epochs)
        return self._batch_of[:epochs]

    def count_in_steps(self, rows: torch.Tensor, begin: int, end: int,
                       until: torch.Tensor | None = None) -> torch.Tensor:
        """int64 [end - begin]: how many of the samples at `rows` each scheduled batch begin..end-1
        holds (before exclusions). until: int64, one per row: the sample at rows[i] counts only in
        steps < until[i] (a sample excluded from step until[i] on)."""
        rows = torch.as_tensor(rows, dtype=torch.int64).reshape(-1)
        if end <= begin:
            return torch.zeros(0, dtype=torch.int64)
        if until is not None:
            until = torch.as_tensor(until, dtype=torch.int64).reshape(-1)
            if until.numel() != rows.numel():
                raise ValueError(f"until has {until.numel()} entries for {rows.numel()} rows")
        if self.batches_per_epoch == 1:  # every step is a whole epoch: it holds every sample (not yet excluded)
            if until is None:
                return torch.full((end - begin,), rows.numel(), dtype=torch.int64)
            excluded_by = torch.searchsorted(until.sort().values, torch.arange(begin, end), right=True)
            return rows.numel() - excluded_by
        return torch.bincount(self.steps_holding(rows, begin, end, until) - begin, minlength=end - begin)

    def steps_holding(self, rows: torch.Tensor, begin: int, end: int,
                      until: torch.Tensor | None = None) -> torch.Tensor:
        """int64, ascending: the steps begin..end-1 whose scheduled batches hold the samples at `rows`
        (before exclusions), one entry per (step, sample) pair (a step holding two of them appears
        twice, side by side: torch.unique_consecutive counts them). One per sample and epoch, so it
        costs the epochs spanned times the samples, not the steps. until: as count_in_steps."""
        rows = torch.as_tensor(rows, dtype=torch.int64).reshape(-1)
        if end <= begin:
            return torch.zeros(0, dtype=torch.int64)
        bpe = self.batches_per_epoch
        first, last = begin // bpe, (end - 1) // bpe + 1
        batch = self.batch_of_rows(last)[first:last][:, rows].to(torch.int64)
        steps = batch + torch.arange(first, last).mul_(bpe).unsqueeze(1)
        if until is not None:  # per row (column): applied before any reordering
            keep = (steps >= begin) & (steps < end) & (steps < torch.as_tensor(until, dtype=torch.int64).reshape(1, -1))
            return steps[keep].sort().values
        if rows.numel() > 1:  # ascending within each epoch; the epochs are in order already
            steps = steps.sort(dim=1).values
        if begin == first * bpe and end == last * bpe:
            return steps.reshape(-1)  # whole epochs: every entry is in range
        return steps[(steps >= begin) & (steps < end)]

    def step_counts(self, rows: torch.Tensor, begin: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(steps, counts), int64: the distinct steps begin..end-1 whose scheduled batches hold any of
        the samples at `rows`, ascending, and how many of them each holds (steps_holding, counted)."""
        return torch.unique_consecutive(self.steps_holding(rows, begin, end), return_counts=True)

    def total_in_steps(self, rows: torch.Tensor, begin: int, end: int) -> int:
        """count_in_steps(rows, begin, end).sum() without a per-step array: every sample is in one
        batch per epoch, so only the first and last epochs the steps cut need a look at the schedule."""
        rows = torch.as_tensor(rows, dtype=torch.int64).reshape(-1)
        if end <= begin or not rows.numel():
            return 0
        bpe = self.batches_per_epoch
        if bpe == 1:
            return rows.numel() * (end - begin)
        first, last = begin // bpe, (end - 1) // bpe  # epochs touched, inclusive

        def in_epoch(e: int, lo: int, hi: int) -> int:  # samples whose batch of epoch e is in lo..hi-1
            # int64: the table's small dtype (int16 up to 2^15 batches) cannot hold hi = batches_per_epoch
            batch = self.batch_of_rows(e + 1)[e, rows].to(torch.int64)
            return int(((batch >= lo) & (batch < hi)).sum())
        if first == last:
            return in_epoch(first, begin - first * bpe, end - first * bpe)
        return (in_epoch(first, begin - first * bpe, bpe) + rows.numel() * (last - first - 1)
                + in_epoch(last, 0, end - last * bpe))

    def samples_in_steps(self, begin: int, end: int) -> int:
        """How many samples the scheduled batches of steps begin..end-1 hold (before exclusions)."""
        def before(t: int) -> int:  # samples in steps 0..t-1: whole epochs, then t's epoch's first batches
            epochs, position = divmod(t, self.batches_per_epoch)
            return epochs * self.ids.numel() + min(self.ids.numel(), position * self.batch_size)
        return before(end) - before(begin) if end > begin else 0

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

    def known(self, ids) -> torch.Tensor:
        """bool, one per id: whether it names a sample of this set."""
        return in_sorted(as_ids(ids), self._sorted_ids)

    def unknown_ids(self, ids) -> torch.Tensor:
        """The ids (in request order, repeats kept) that name no sample of this set."""
        ids = as_ids(ids)
        return ids[~in_sorted(ids, self._sorted_ids)]

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

    def loop_sampler(self, schedule: BatchSchedule, next_step: Callable[[], int], rng_states: dict) -> LoopSampler:
        """The batch sampler of a user's loop over `schedule` (loading.LoopSampler)."""
        return LoopSampler(schedule, self.rows, next_step, rng_states)

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
    """An ordinary SGD run over the fixed batch schedule. lr: a float or a function of the step.
    momentum / nesterov: torch.optim.SGD's heavy-ball or Nesterov momentum (dampening 0); the
    default 0 is plain SGD."""
    epochs: int
    batch_size: int
    lr: float | Callable[[int], float]
    weight_decay: float = 0.0
    seed: int = 0
    momentum: float = 0.0
    nesterov: bool = False

    def __post_init__(self):
        if not 0.0 <= float(self.momentum) < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.nesterov and not self.momentum > 0:
            raise ValueError("nesterov=True needs momentum > 0 (as torch.optim.SGD)")

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
                         weight_decay=self.weight_decay, seed=seed, momentum=self.momentum, nesterov=self.nesterov)

    def fingerprint(self) -> dict:
        momentum = {"momentum": self.momentum, "nesterov": self.nesterov} if self.momentum else {}
        return {"optimizer": "plain SGD", "epochs": self.epochs, "batch_size": self.batch_size, "seed": self.seed,
                "weight_decay": self.weight_decay, **momentum}


def momentum_optimizer(model: torch.nn.Module, momentum: float, nesterov: bool,
                       weight_decay: float) -> torch.optim.SGD | None:
    """torch.optim.SGD over the model's trainable parameters for a momentum run (its buffer is the
    state such a run carries from step to step; sgd_step sets its lr per step), or None for plain
    SGD (sgd_step's own arithmetic). The loops that must agree with a user's momentum run
    (train_sgd, the history methods' exact fallback) all step through torch's optimizer."""
    if not momentum:
        return None
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=0.0, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)


def sgd_step(model: torch.nn.Module, data: TrainingData, ids: torch.Tensor, lr: float,
             weight_decay: float, optimizer: torch.optim.SGD | None = None) -> tuple | None:
    """One step of w <- w - lr * (mean per-sample loss gradient over the present ids + wd * w).
    The mean is over the samples present (a batch with forgotten ids removed averages the rest),
    which is what retraining on the retained set does; an empty batch makes no update.
    optimizer: a momentum run's torch.optim.SGD (momentum_optimizer; its weight decay applies),
    stepped with this gradient at learning rate lr; an empty batch leaves its buffer alone.
    Returns the mean loss gradient (per trainable parameter, without weight decay) at the weights
    before the step, or None for an empty batch (DeltaGrad's exact prefix keeps it)."""
    if ids.numel() == 0:
        return None
    x, y = data.batch(ids)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(data.loss(model(x), y).mean(), params)
    if optimizer is not None:
        for p, g in zip(params, grads):
            p.grad = g
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        for p in params:
            p.grad = None
        return grads
    with torch.no_grad():  # torch.optim.SGD's own arithmetic, so a user's plain-SGD loop agrees bit for bit
        for p, g in zip(params, grads):
            if weight_decay:
                g = g.add(p, alpha=weight_decay)
            p.add_(g, alpha=-lr)
    return grads


def train_sgd(model: torch.nn.Module, data: TrainingData, config: SGDConfig, *, exclude=None,
              on_step: Callable | None = None) -> torch.nn.Module:
    """Trains `model` in place with plain SGD over the schedule of `config` minus `exclude`.

    on_step(t, ids, model) runs before step t's update (e.g. to record history). With
    config.momentum the steps are torch.optim.SGD's heavy-ball or Nesterov steps (momentum_optimizer).
    """
    schedule = BatchSchedule(data.ids, config.batch_size, config.seed)
    excluded = as_ids([] if exclude is None else exclude)
    optimizer = momentum_optimizer(model, config.momentum, config.nesterov, config.weight_decay)
    for step in schedule.steps(0, config.steps(len(data)), excluded):
        if on_step is not None:
            on_step(step.step, step.ids, model)
        sgd_step(model, data, step.ids, config.lr_at(step.step), config.weight_decay, optimizer)
        if step.position == schedule.batches_per_epoch - 1:
            logging.getLogger("unlearn_ext").debug("trained epoch %d of %d (SGD)", step.epoch + 1, config.epochs)
    return model


def retrain(initial: torch.nn.Module, data: TrainingData, recipe, forgotten) -> torch.nn.Module:
    """The gold standard: a copy of the initial model trained from scratch with the same recipe
    (SGDConfig or the user's OptimizerRecipe), seed and batch order, the forgotten ids deleted
    inside their batches. `initial` is not changed."""
    return recipe.train(copy.deepcopy(initial), data, exclude=forgotten)


def retrain_cost(data: TrainingData, config, forgotten) -> int:
    """Sample-gradient evaluations retraining without `forgotten` costs (the unit of every report's
    cost): each retained sample once per epoch. config: the run's recipe (SGDConfig or
    OptimizerRecipe) or its number of epochs."""
    epochs = int(config) if isinstance(config, int) else int(config.epochs)
    kept = len(data) - int(torch.isin(data.ids, as_ids(forgotten)).sum())
    return epochs * kept
