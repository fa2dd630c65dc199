"""PCMU with the batch's per-sample gradients computed across the ranks of a process group
(docs/design.md §12 and §4).

Every rank holds the same model, data, schedule and records; at step t rank r computes the clipped
float64 per-sample sum of its slice of batch t only (`rank_slice`: contiguous, sizes differing by
at most one, fixed by (batch size, world size)); the ranks' sums are all-gathered and added in
rank order, so every rank holds the same float64 bits, quantizes with the same Philox offsets and
applies the same codes: parameters, records and certificates are identical on every rank, and the
ranks need no parameter broadcast. Retraining without F (the fallback, `resume_without`) uses the
same split of each batch with F removed.

Against one process: the batch's sum is grouped differently (per rank, then in rank order), so
its float64 value may differ in the last bits; v is rounded to float32 before it is quantized and
recorded, so codes and records are equal unless a coordinate's float64 sum lies within that
rounding of a float32 half-way point, and the per-request check's float64 comparisons are covered
by the rounding margin (pcmu/margin.py). The tests compare with the single-process run bit for bit.

Every method that computes gradients (training steps, check_request, resume_without, the
unlearner's requests) is collective: every rank calls it, in the same order. Framework 'D' is not
supported here.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..pcmu.trainer import PCMUTrainer
from .group import agree, exchange_device, require_group, sum_in_rank_order


def rank_slice(ids, rank: int, world: int):
    """Rank `rank`'s share of a batch (a 1-D tensor or a list): ids[rank*n//world : (rank+1)*n//world],
    in batch order."""
    n = len(ids)
    return ids[rank * n // world:(rank + 1) * n // world]


class DistributedPCMUTrainer(PCMUTrainer):
    """A PCMUTrainer whose per-sample sums are split across `group`'s ranks (module docstring).

    Construct it on every rank with the same arguments (model initialized identically, e.g. from
    the same seed or a broadcast state dict; the same data). For a DDP-wrapped model pass
    `ddp_model.module`: PCMU computes and applies its own update, identically on every rank, so
    DDP's gradient all-reduce is not used. Train with `for ids in trainer.batches(epochs):
    trainer.step(ids)` or `trainer.train(...)` on every rank."""

    def __init__(self, model: torch.nn.Module, loss_fn, data, *, group=None, **options):
        self.group = require_group(group)
        self.rank, self.world = dist.get_rank(self.group), dist.get_world_size(self.group)

        def build():  # inside the agreement: a rank refusing its options makes every rank refuse
            if options.get("framework", "G") != "G":
                raise ValueError("distributed PCMU supports framework 'G' (gradient smoothing) only")
            PCMUTrainer.__init__(self, model, loss_fn, data, **options)
            floats = (self.clip_norm, self.tau, self.sigma)
            return (self.batch_size, self.seed, int(self.schedule.shuffle), self.coordinates, len(self.data.ids),
                    self.max_request, *(int(torch.tensor(v, dtype=torch.float64).view(torch.int64)) for v in floats))
        agree(build, shared=("batch_size", "seed", "shuffle", "coordinates", "data size", "max_request", "clip_norm",
                             "tau", "sigma"), group=self.group)
        self._check_same_start()

    def _check_same_start(self) -> None:
        """The ranks must start from the same weights: each step only adds the same codes."""
        flat = torch.cat([p.detach().reshape(-1).to(torch.float64) for p in self.params]).to(
            exchange_device(self.group))
        first = flat.clone()
        dist.broadcast(first, src=dist.get_global_rank(self.group, 0), group=self.group)
        same = torch.tensor([int(torch.equal(flat, first))], dtype=torch.int64, device=flat.device)
        dist.all_reduce(same, op=dist.ReduceOp.MIN, group=self.group)
        if not int(same[0]):
            raise ValueError("the ranks' initial parameters differ: initialize the model from the same seed on "
                             "every rank, or load rank 0's state dict everywhere, before building the trainer")

    def _batch_sums64(self, named: dict, ids: torch.Tensor) -> dict:
        mine = rank_slice(ids, self.rank, self.world)
        if mine.numel():
            local = super()._batch_sums64(named, mine)
        else:  # a rank whose slice is empty still joins the gather
            local = {k: self._sums[k].zero_() for k in self.names}
        total = sum_in_rank_order(torch.cat([local[k].reshape(-1) for k in self.names]), self.group)
        out, start = {}, 0
        for k in self.names:
            n = local[k].numel()
            out[k] = total[start:start + n].view(local[k].shape).to(local[k].device)
            start += n
        return out

    def step(self, ids: torch.Tensor, *, step_size: float | None = None, clipped_sums: dict | None = None):
        if clipped_sums is not None:
            raise ValueError("distributed PCMU computes each rank's part of the batch's sums itself: "
                             "clipped_sums= (a whole batch's sums from one process) is not accepted")
        return super().step(ids, step_size=step_size)
