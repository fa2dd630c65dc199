"""Mini-Unlearning and DeltaGrad with their data passes split across the ranks of a process group
(docs/design.md §12 and §6).

Every rank holds the same model, data and history (each rank recorded the same run, or loaded the
same store). What costs sample-gradients is split: a gradient or loss over a set of ids (the
forgotten set F, a retained batch, the curvature subsample, the loss check's subsample) is
computed by each rank on its slice of those ids (`rank_slice`: contiguous, fixed by the set's size
and the world size) and the ranks' sums are added in rank order; a Hessian-vector product likewise
over the curvature subsample. DeltaGrad's replay takes its per-step gradients through its working
copy of the model (mini/replay_model.py), which asks the flat model for the rank's slice
(`my_ids`) and for the rank-order sum (`sum_over_ranks`): its data passes are split the same way.
Every rank then holds the same float64 bits, so the Lanczos recurrence, the spectral propagation,
DeltaGrad's replay and every safety check run identically on every rank: the weights every rank
ends with are equal bit for bit, and equal the single-process answer up to float rounding (the
sums are grouped per rank).

Not split: retraining itself (training without F from the stored weights at step 0: Mini-Unlearning's
fallback, the retained batches' steps of DeltaGrad's exact prefix and the fallback that continues
it), which every rank runs in full (the same arithmetic as one process, so the same weights); the
removed samples' gradients at the prefix's steps are the replay's, split.

A history sharded across the ranks (each rank its shard's store, `RankShardHistory`: parameters
split flat or as FSDP places them) is read shard-locally (shard_local.py): each rank decodes only
its own shard, recorded gradients enter through dot / axpy on its codes, and only the weights a
forward pass runs at are assembled. The answer equals the one from the reassembled history up
to float rounding.

Every call that computes (construction, unlearn) is collective: call it on every rank, in the same
order. Construction checks that the ranks agree on the data size, the history (its digest), the
model's weights and the method's options; a request, that every rank names the same ids.
"""
from __future__ import annotations

import hashlib
import json

import torch
import torch.distributed as dist

from ..mini.curvature import HessianOperator
from ..mini.deltagrad import DeltaGradUnlearner
from ..mini.unlearner import MiniUnlearner
from ..mini.vectors import FlatModel
from .group import agree, require_group, sum_in_rank_order
from .ledger import state_digest
from .pcmu import rank_slice
from .shard_local import RankShardHistory


class RankSplitFlatModel(FlatModel):
    """FlatModel whose mean losses and gradients over a set of ids are computed by the ranks of
    `group` together: each rank its slice of the ids, summed in rank order (float64)."""

    def __init__(self, model: torch.nn.Module, data, group):
        super().__init__(model, data)
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)

    def my_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return rank_slice(ids, self.rank, self.world)

    def sum_over_ranks(self, local_sum: torch.Tensor) -> torch.Tensor:
        """Every rank's sum over its slice, added in rank order in float64 (the same bits on every rank)."""
        return sum_in_rank_order(local_sum.double(), self.group)

    def mean_loss_grad(self, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if ids.numel() == 0:  # the same decision on every rank: no collective
            return torch.zeros(self.dim, dtype=torch.float32)
        # This rank's sum as computed (not its mean times its count: a rounding one process does
        # not take), the ranks' sums added in float64, divided once.
        local = self.loss_grad_sum(w, self.my_ids(ids))
        return (self.sum_over_ranks(local) / ids.numel()).float()

    def mean_loss(self, w: torch.Tensor, ids: torch.Tensor) -> float:
        mine = self.my_ids(ids)
        local = super().mean_loss(w, mine) * mine.numel() if mine.numel() else 0.0
        total = sum_in_rank_order(torch.tensor([local], dtype=torch.float64), self.group)
        return float(total[0]) / ids.numel()


class RankSummedHessian:
    """v -> H v over `ids` plus weight_decay * v (HessianOperator's contract), each rank taking the
    products of its slice of ids: H v = sum_r (|ids_r| / |ids|) H_r v, added in rank order."""

    def __init__(self, flat: RankSplitFlatModel, w: torch.Tensor, ids: torch.Tensor, weight_decay: float):
        mine = flat.my_ids(ids)
        self.flat, self.wd, self.count = flat, float(weight_decay), int(ids.numel())
        self.weight = mine.numel() / self.count
        # A rank with an empty slice contributes zeros (and still joins every sum).
        self.local = HessianOperator(flat, w, mine, 0.0) if mine.numel() else None
        self.products = 0

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.products += 1
        local = self.local(v) * self.weight if self.local is not None else torch.zeros(v.numel(), dtype=torch.float64)
        return sum_in_rank_order(local, self.flat.group) + self.wd * v.double()

    @property
    def sample_gradients(self) -> int:
        """The job's cost (every rank's share), as one process would count it."""
        return 2 * self.count * self.products


def _digest64(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16)


def _setup_values(unlearner, options: dict) -> tuple:
    """What every rank must hold equally: data size, history, weights, options (in agree's order)."""
    return (len(unlearner.data), _digest64(unlearner.history_sha256), state_digest(unlearner.flat.flat()),
            state_digest(sorted(options.items())))


SETUP_NAMES = ("data size", "history (its sha256)", "model weights", "options")


def _recorded_run(store) -> int:
    """The run metadata and schedule (lrs, batch ids) of a history: what the ranks' shards of one
    sharded history hold equally."""
    return state_digest([json.dumps(store.run_info, sort_keys=True)] + [
        [step, repr(lr), repr(lrs), ids if ids is not None else "-"] for step, lr, lrs, ids in store.schedule()])


def _sharded_setup_values(unlearner, options: dict) -> tuple:
    """As _setup_values for a sharded history: each rank's shard digest differs, so the ranks
    compare the recorded run and pass their shard digests as local values (last)."""
    data_size, _, weights, opts = _setup_values(unlearner, options)
    return data_size, _recorded_run(unlearner.store), weights, opts, _digest64(unlearner.history_sha256)


SHARDED_SETUP_NAMES = ("data size", "history (its run metadata and schedule)", "model weights", "options")


def agree_on_request(unlearner, ids, group) -> None:
    """Every rank checks the request itself (empty, unknown ids) and that it names the same ids as
    every other rank; any refusal raises on every rank before work starts."""
    def check():
        unlearner.split_request(ids)
        return (state_digest(torch.as_tensor(ids).reshape(-1).tolist()),)
    agree(check, shared=("the request's ids",), group=group)


class _AcrossRanks:
    """What both history methods do across ranks: build on every rank inside one agreement (one
    rank's refusal is every rank's), replace the gradient source by the rank-split one, and agree on
    each request's ids before answering. Mixed in before the single-process class."""

    def __init__(self, model, data, store, *, group=None, **options):
        self.group = require_group(group)
        sharded = isinstance(store, RankShardHistory)

        def build():
            super(_AcrossRanks, self).__init__(model, data, store, **options)
            self.flat = RankSplitFlatModel(model, data, self.group)
            if not sharded:
                return _setup_values(self, options)
            if store.shard.total != self.flat.dim:
                raise ValueError(f"the sharded history holds {store.shard.total} elements per step; the model has "
                                 f"{self.flat.dim} trainable parameters")
            return _sharded_setup_values(self, options)
        if not sharded:
            agree(build, shared=SETUP_NAMES, group=self.group)
            return
        rows = agree(build, shared=SHARDED_SETUP_NAMES, local=("history shard",), group=self.group)
        # The job's history is every rank's shard: its digest is theirs in rank order (the same on every rank).
        self.history_sha256 = hashlib.sha256(",".join(str(int(v)) for v in rows[:, -1]).encode()).hexdigest()

    def _stored(self, step, name):
        if isinstance(self.store, RankShardHistory):
            return self.store.stored(step, name)
        return super()._stored(step, name)

    def unlearn(self, ids):
        agree_on_request(self, ids, self.group)
        return super().unlearn(ids)


class DistributedMiniUnlearner(_AcrossRanks, MiniUnlearner):
    """MiniUnlearner across the ranks of `group` (module docstring): Hessian-vector products summed
    across ranks as well. Same arguments as MiniUnlearner, on every rank (the same model weights,
    data and history)."""

    hessian = RankSummedHessian


class _ShardGradient:
    """A recorded step's gradient on this rank's codes, as DeltaGradUnlearner._recorded's: add_g(y,
    alpha), y += alpha g_t (the axpy on each rank's codes, exchanged); scaled(alpha): alpha g_t alone
    (the same axpy into zeros)."""

    def __init__(self, field, flat):
        self.field, self.flat = field, flat

    def __call__(self, y: torch.Tensor, alpha: float) -> None:
        self.field.axpy_(self.flat.split(y), alpha)

    def scaled(self, alpha: float) -> torch.Tensor:
        term = torch.zeros(self.flat.dim, dtype=torch.float32)
        self(term, alpha)
        return term


class DistributedDeltaGradUnlearner(_AcrossRanks, DeltaGradUnlearner):
    """DeltaGradUnlearner across the ranks of `group` (module docstring): each replayed step's
    retained and forgotten gradients are split across the ranks. Same arguments as
    DeltaGradUnlearner, on every rank."""

    def _recorded(self, steps: list):
        """A rank's shard of a sharded history is read step by step, shard-locally (its weights' gap
        and its gradient's axpy on the codes exchange across ranks at each step); a whole history
        as in one process."""
        if not isinstance(self.store, RankShardHistory):
            yield from super()._recorded(steps)
            return
        for t in steps:
            w_t, field = self.store.stored(t, "params"), self.store.encoded(t, "grads")
            yield w_t, _ShardGradient(field, self.flat)
