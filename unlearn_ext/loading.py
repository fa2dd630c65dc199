"""Items from the user's map-style `Dataset`, loaded in batches, and the batch sampler that makes a
`DataLoader` yield exactly the batch schedule's batches.

  * `ScheduleSampler` is a `torch.utils.data` batch sampler: each pass over it (one epoch of the
    user's loop) yields the schedule's batches of the next epoch as dataset indices, forgotten ids
    removed inside their batches (a batch left empty is skipped). The user's own `DataLoader`
    (workers, pin_memory, collate_fn) then loads them.
  * The indices it yields are `ScheduledIndex` values: plain ints (any dataset indexes with them)
    that also carry the epoch and the sample's id, so a `SeededDataset` can make random augmentation
    a function of (seed, epoch, id) -- what retraining must repeat exactly.
"""
from __future__ import annotations

import random
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate


class ScheduledIndex(int):
    """A dataset index (an int) that knows the epoch it is loaded for and its sample's id."""

    epoch: int
    sample_id: int

    def __new__(cls, row: int, epoch: int, sample_id: int):
        index = super().__new__(cls, row)
        index.epoch, index.sample_id = int(epoch), int(sample_id)
        return index

    def __reduce__(self):  # so DataLoader workers receive the epoch and id too
        return ScheduledIndex, (int(self), self.epoch, self.sample_id)


# The epoch seeded items use when loaded outside a scheduled epoch (e.g. a method evaluating
# gradients on F): every such load gives the same augmented item.
UNSCHEDULED_EPOCH = -1


def checked_seed(seed, name: str = "seed") -> int:
    """`seed` as an int, refused unless it is a non-negative integer (numpy's seed sequences, which
    draw the batch order and the augmentation seeds, take no negative one; a float is not truncated)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {seed!r}")
    return int(seed)


class SeededDataset(Dataset):
    """Wraps a dataset whose items use random augmentation so that the randomness of an item is a
    function of (seed, epoch, id): every load of the same item in the same epoch -- in training, in
    retraining without forgotten ids, in any worker process -- draws the same augmentation.

    Around each item, torch's, numpy's and Python's global random generators are seeded from those
    three numbers and restored afterwards (so the training loop's own random draws, e.g. dropout,
    are untouched). A transform that keeps its own generator (not the global ones) is not covered:
    retraining then sees other augmentations than training and is no longer exact.
    """

    def __init__(self, dataset: Dataset, seed: int = 0):
        check_map_style(dataset)
        self.dataset, self.seed = dataset, checked_seed(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def item_seed(self, epoch: int, sample_id: int) -> int:
        return int(np.random.SeedSequence([self.seed, epoch + 1, sample_id & (2**63 - 1)]).generate_state(1)[0])

    def __getitem__(self, index):
        epoch = getattr(index, "epoch", UNSCHEDULED_EPOCH)
        sample_id = getattr(index, "sample_id", int(index))
        seed = self.item_seed(epoch, sample_id)
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed)
            try:
                return self.dataset[int(index)]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


class TensorItems(Dataset):
    """In-memory (inputs, targets) tensors as a map-style dataset of (input, target) pairs."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor):
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def __getitem__(self, index):
        return self.inputs[int(index)], self.targets[int(index)]


def check_map_style(dataset) -> None:
    if isinstance(dataset, torch.utils.data.IterableDataset) or not (
            hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise TypeError(f"expected a map-style dataset (an object with __len__ and __getitem__, e.g. a "
                        f"torch.utils.data.Dataset), got {type(dataset).__name__}: deletion requests name items "
                        "by index or id, which a stream cannot serve")


def collate_pairs(items: list, collate: Callable = default_collate) -> tuple:
    """(inputs, targets) of a batch of items. What is checked is the collated batch, not the items:
    a collate_fn of the user's may turn any item (a dict, a triple) into the (inputs, targets) pair
    their loop unpacks."""
    batch = collate(items)
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        length = f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""
        raise TypeError(f"a batch must collate to an (inputs, targets) pair, as `for x, y in loader` unpacks it; "
                        f"the dataset's items ({type(items[0]).__name__}) collated to {type(batch).__name__}"
                        f"{length}: make each item an (input, target) pair, or give the DataLoader a "
                        "collate_fn that returns (inputs, targets)")
    x, y = batch
    return x, y


class ScheduleSampler(torch.utils.data.Sampler):
    """Batch sampler over a `BatchSchedule`: the k-th pass over it yields epoch `first_epoch + k`.

    rows_of(ids) maps sample ids to dataset indices. exclude: ids removed inside their batches
    (retraining without them); batches left empty are skipped (they make no update)."""

    def __init__(self, schedule, rows_of: Callable, exclude: torch.Tensor | None = None, first_epoch: int = 0):
        self.schedule, self.rows_of, self.exclude = schedule, rows_of, exclude
        self.epoch = int(first_epoch)  # the epoch the next pass yields

    def batches(self, epoch: int) -> list:
        """The epoch's non-empty batches as lists of ScheduledIndex."""
        spe = self.schedule.batches_per_epoch
        out = []
        for step in self.schedule.steps(epoch * spe, (epoch + 1) * spe, self.exclude):
            if step.ids.numel():
                rows = self.rows_of(step.ids).tolist()
                out.append([ScheduledIndex(r, epoch, i) for r, i in zip(rows, step.ids.tolist())])
        return out

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        yield from self.batches(epoch)

    def __len__(self) -> int:
        if self.exclude is None or self.exclude.numel() == 0:
            return self.schedule.batches_per_epoch
        return len(self.batches(self.epoch))


class LoopSampler(ScheduleSampler):
    """The batch sampler of the user's own loop (UnlearningEngine): a pass starts at the optimizer
    step the loop takes next (`next_step()`), not at the pass count, so a pass that trains nothing
    -- a peek at one batch, an evaluation over the training loader -- does not shift the batches
    the loop's steps train on (retraining and the history follow the step). A pass started inside
    an epoch yields that epoch's remaining batches.

    At the start of each epoch's pass torch's global RNG state is kept in `rng_states[epoch]` (the
    last such pass wins: the one that trains), so retraining can start each epoch from the state
    the loop had, whatever the loop drew between epochs (a validation DataLoader's seed draw,
    dropout in a validation pass left in training mode)."""

    def __init__(self, schedule, rows_of: Callable, next_step: Callable[[], int], rng_states: dict):
        super().__init__(schedule, rows_of)
        self.next_step, self.rng_states = next_step, rng_states

    def __iter__(self):
        epoch, position = divmod(self.next_step(), self.schedule.batches_per_epoch)
        if position == 0:
            self.rng_states[epoch] = torch.get_rng_state()
        yield from self.batches(epoch)[position:]
