"""A DistributedDataParallel model in the user's own loop (docs/design.md §12 and §13): what
`UnlearningEngine.make_unlearnable` needs to serve it.

Under DDP every rank holds the same (replicated) parameters and, after backward, the same
gradient: the mean of the ranks' mean gradients. The engine's loader gives each rank a fixed share
of every scheduled batch (`RankShareSampler`: rank_slice of the batch), so that mean is the whole
batch's mean gradient -- when the shares are equal in size. DDP averages per-rank means with equal
weights, so unequal shares would weight some samples more than others and the recorded gradients
would not be the batch gradients that the history methods replay; `check_even_shares` refuses
such a schedule before training.

Every rank then holds the same parameters and reduced gradients, so every rank records the same
history into its own store (in memory, or a disk file of its own: `rank_history_path`), and every
rank can answer deletion requests with the distributed unlearners (history_methods.py), which
first check that the ranks' histories agree (their digests).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .group import DistributedRefusal, agree, every_ranks_row
from .pcmu import rank_slice

# Training flags packed per int64 word of the exchange that names the modules in different modes
# (63 bits: the sign bit stays clear).
_FLAGS_PER_WORD = 63


@dataclass
class DDPPlacement:
    """Where this process sits in a DDP job: the wrapped module, its group, rank and world size."""
    module: torch.nn.Module
    group: object
    rank: int
    world: int


def rank_history_path(path, rank: int) -> str:
    """The disk store of `rank` for the user's history path: every rank writes its own file
    (`<path>.rank<r>`), so ranks sharing a file system never write to one file."""
    return f"{os.fspath(path)}.rank{int(rank)}"


def ddp_placement(model: torch.nn.Module) -> DDPPlacement | None:
    """The placement of a DistributedDataParallel model; None for any other module."""
    if not isinstance(model, DistributedDataParallel):
        return None
    group = model.process_group
    return DDPPlacement(model.module, group, dist.get_rank(group), dist.get_world_size(group))


def check_even_shares(n: int, batch_size: int, world: int) -> None:
    """Refuses a schedule whose batches do not split into `world` equal shares (module docstring)."""
    sizes = {batch_size} | ({n % batch_size} if n % batch_size else set())
    uneven = sorted(s for s in sizes if s % world)
    if uneven:
        raise ValueError(f"under DistributedDataParallel each of the {world} ranks takes an equal share of every "
                         f"batch (DDP averages the ranks' mean gradients with equal weights); batches of "
                         f"{', '.join(map(str, uneven))} samples do not split into {world} equal shares "
                         f"({n} samples, batch_size {batch_size}): choose a batch_size (and data size) whose "
                         f"batches are multiples of {world}")


class RankShareSampler(torch.utils.data.Sampler):
    """A batch sampler yielding this rank's share (rank_slice) of each batch of `batches`."""

    def __init__(self, batches, rank: int, world: int):
        self.batches, self.rank, self.world = batches, int(rank), int(world)

    def __iter__(self):
        for batch in self.batches:
            yield rank_slice(batch, self.rank, self.world)

    def __len__(self) -> int:
        return len(self.batches)


def _digest(text: str) -> int:
    """A 63-bit digest of `text` (an int64 slot of an agreement)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def check_same_training_modes(modes: dict[str, bool], group) -> None:
    """Refuses, on every rank, step 0's training modes (policy.training_modes: each module's flag by
    name) unless every rank holds the same: the recipe keeps one rank's modes and retraining trains
    in them, so a rank whose modules trained in other modes (one rank's model left in eval mode) would
    have made the history of another loop. One agreement on digests of the module names and of the
    flags; only when the flags differ, a second exchange of every rank's flags (packed bits) names
    the modules that differ."""
    names = list(modes)
    flags = [bool(modes[name]) for name in names]
    rows = agree(lambda: (len(names), _digest("\n".join(names)), _digest("".join("1" if f else "0" for f in flags))),
                 shared=(), local=("the module count", "the module names' digest", "the training flags' digest"),
                 group=group)
    if len(set(rows[:, 0].tolist())) > 1 or len(set(rows[:, 1].tolist())) > 1:
        raise DistributedRefusal(f"under DistributedDataParallel every rank must train the same model; the ranks' "
                                 f"models have different modules ({rows[:, 0].tolist()} modules, rank order)")
    if len(set(rows[:, 2].tolist())) == 1:
        return
    words = torch.zeros(-(-len(flags) // _FLAGS_PER_WORD), dtype=torch.int64)
    for i, flag in enumerate(flags):
        if flag:
            words[i // _FLAGS_PER_WORD] |= 1 << (i % _FLAGS_PER_WORD)
    every = every_ranks_row(words, group)
    differing = []
    for i, name in enumerate(names):
        bits = [(int(row[i // _FLAGS_PER_WORD]) >> (i % _FLAGS_PER_WORD)) & 1 for row in every]
        if len(set(bits)) > 1:
            training = [r for r, b in enumerate(bits) if b]
            evaluating = [r for r, b in enumerate(bits) if not b]
            differing.append(f"{name or '(model)'} (train() on rank(s) {training}, eval() on rank(s) {evaluating})")
    shown = "; ".join(differing[:5]) + (f"; ... ({len(differing)} modules)" if len(differing) > 5 else "")
    raise DistributedRefusal(
        f"at optimizer step 0 the ranks' modules are in different training modes: {shown}. Retraining trains "
        "every step in one set of modes, so the ranks would have trained differently from it: put every rank's "
        "model in the same modes (e.g. model.train() on every rank) before the first step")
