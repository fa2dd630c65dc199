"""The model as a function of one flat parameter vector, and the gradients both history methods
need (mean per-sample loss over a set of rows, batched by torch.func: no Python loop per sample).

Mini-Unlearning and DeltaGrad work on flat vectors (d = number of trainable parameters): their
linear algebra (Lanczos, spectral filters, L-BFGS) is on vectors, and `FlatModel` is the one place
that converts between a flat vector and the model's named tensors.
"""
from __future__ import annotations

import math

import torch
from torch.func import functional_call

from ..data import TrainingData
from ..forward import eval_mode
from ..parameters import trainable

# Rows per forward/backward pass when a gradient covers many samples (bounds activation memory).
CHUNK = 4096


class FlatModel:
    def __init__(self, model: torch.nn.Module, data: TrainingData):
        self.model, self.data = model, data
        params = trainable(model)
        self.names = list(params)
        self.shapes = [tuple(p.shape) for p in params.values()]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.dim = sum(self.sizes)
        self.buffers = {k: v.detach() for k, v in model.named_buffers()}

    # ---- conversions --------------------------------------------------------------------------

    def flat(self) -> torch.Tensor:
        """The model's current trainable parameters as one float32 vector (a copy)."""
        return torch.cat([p.detach().reshape(-1).float() for p in trainable(self.model).values()])

    def split(self, w: torch.Tensor) -> list:
        """A flat vector as tensors shaped like the parameters (views of w)."""
        return [part.view(s) for part, s in zip(torch.split(w, self.sizes), self.shapes)]

    def join(self, tensors) -> torch.Tensor:
        return torch.cat([t.detach().reshape(-1).float() for t in tensors])

    def load_(self, w: torch.Tensor) -> None:
        """Copies a flat vector into the model's parameters (the model keeps its identity)."""
        with torch.no_grad():
            for p, v in zip(trainable(self.model).values(), self.split(w)):
                p.copy_(v.to(p.dtype))

    # ---- this process's share of a data pass -----------------------------------------------------
    # One process takes every id and its sum is the total. Across ranks (distributed/history_methods.py,
    # RankSplitFlatModel) each rank takes its slice and the ranks' sums are added in rank order; a
    # replay's working copy (mini/replay_model.py) asks these two so that its passes split the same way.

    def my_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """The ids of a set this process computes on: all of them."""
        return ids

    def sum_over_ranks(self, local_sum: torch.Tensor) -> torch.Tensor:
        """The total of every process's sum over its `my_ids`: here, this process's own (the same tensor)."""
        return local_sum

    # ---- losses and gradients -----------------------------------------------------------------

    def _dtype(self):
        return next(iter(trainable(self.model).values())).dtype

    def loss_sum(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Sum of per-sample losses of rows (x, y) at flat weights w (differentiable in w)."""
        params = dict(zip(self.names, self.split(w.to(self._dtype()))))
        # Replays run in eval mode (policy.py): dropout off, and no BatchNorm statistics updated.
        with eval_mode(self.model):
            return self.data.loss(functional_call(self.model, (params, self.buffers), (x,)), y).sum()

    def mean_loss(self, w: torch.Tensor, ids: torch.Tensor) -> float:
        """(1/|ids|) sum_{i in ids} l_i(w) as a Python float, without weight decay (no gradient)."""
        x, y = self.data.batch(ids)
        with torch.no_grad():
            return float(self.loss_sum(w.float(), x, y)) / ids.numel()

    def mean_loss_grad(self, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """grad of (1/|ids|) sum_{i in ids} l_i(w), float32, without weight decay. Costs |ids|
        sample-gradients. Empty ids give zeros."""
        total = self.loss_grad_sum(w, ids)
        return total / ids.numel() if ids.numel() else total

    def loss_grad_sum(self, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """grad of sum_{i in ids} l_i(w), float32 (zeros for no ids): what mean_loss_grad divides.

        Plain reverse mode on a flat leaf rather than torch.func.grad: the same numbers, half the
        per-call overhead (DeltaGrad calls this once or twice per replayed step on small batches:
        ~0.5 ms vs ~1 ms per call on digits)."""
        total = torch.zeros(self.dim, dtype=torch.float32)
        leaf = w.detach().requires_grad_(True)
        for lo in range(0, ids.numel(), CHUNK):
            x, y = self.data.batch(ids[lo:lo + CHUNK])
            total += torch.autograd.grad(self.loss_sum(leaf, x, y), leaf)[0].float()
        return total


class StoredVector:
    """One recorded step's field (weights or a gradient) as the history methods use it: whole (to
    start a replay or run a forward pass at it) or as the difference x - v (a gap or a drift).
    This one holds the decoded values; with a history sharded across ranks each rank holds only its
    shard's values and builds these results from the ranks' slices (distributed/shard_local.py)."""

    def __init__(self, values: torch.Tensor):
        self.values = values

    def whole(self) -> torch.Tensor:
        return self.values.clone()

    def subtracted_from(self, x: torch.Tensor) -> torch.Tensor:
        """x - v in x's dtype."""
        return x - self.values.to(x.dtype)


def stored_vector(store, step: int, name: str) -> StoredVector:
    """Field `name` of recorded step `step` of a (single-process) history store, decoded straight
    into one flat vector (the field's tensors are the trainable parameters, in order)."""
    return StoredVector(store.read_flat(step, name))
