"""A private working copy of the model for a replay that takes one gradient per step (DeltaGrad).

`FlatModel.mean_loss_grad` rebuilds the model's parameters from the flat vector on every call
(functional_call swaps every parameter in and out, and the eval-mode switch walks every module).
On small models that bookkeeping costs more than the forward and backward passes themselves, and a
replay pays it once or twice per recorded step. `ReplayModel` pays it once per request: a copy of
the model, put in eval mode once (replays run in eval mode: dropout off, BatchNorm on its running
statistics, which no forward pass moves), whose trainable parameters are views into one flat
buffer. A gradient at flat weights w is then one copy of w into that buffer, one forward pass and
one backward pass.

The numbers are those of `FlatModel.mean_loss_grad`: the same modules, the same per-sample losses
summed per chunk of rows, divided by the number of rows (tests/test_deltagrad_fast.py compares
them, on a model with BatchNorm in eval mode among others).
"""
from __future__ import annotations

import copy

import torch

from .vectors import CHUNK, FlatModel


class ReplayModel:
    def __init__(self, flat: FlatModel):
        # A copy, so that the user's model (its parameters, .grad and training flags) is never
        # touched; retraining deep-copies the model the same way, so any model it accepts works here.
        self.data = flat.data
        self.module = copy.deepcopy(flat.model).eval()
        self.params = [self.module.get_parameter(name) for name in flat.names]
        self.dtype = self.params[0].dtype if self.params else torch.float32
        self.weights = torch.zeros(flat.dim, dtype=self.dtype)
        for p, view in zip(self.params, torch.split(self.weights, flat.sizes)):
            p.data = view.view(p.shape)  # every parameter now reads the flat buffer
            p.grad = None
        self.dim = flat.dim

    def _set(self, w: torch.Tensor) -> None:
        self.weights.copy_(w.detach())

    def _grad_of(self, loss: torch.Tensor, retain_graph: bool = False) -> torch.Tensor:
        grads = torch.autograd.grad(loss, self.params, retain_graph=retain_graph, allow_unused=True,
                                    materialize_grads=True)
        return torch.cat([g.reshape(-1) for g in grads]).float()

    def _loss_sum(self, x, y) -> torch.Tensor:
        return self.data.loss(self.module(x), y).sum()

    def mean_loss_grad(self, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """grad of (1/|ids|) sum_{i in ids} l_i(w), float32, without weight decay (as
        FlatModel.mean_loss_grad). Empty ids give zeros."""
        if ids.numel() == 0:
            return torch.zeros(self.dim, dtype=torch.float32)
        self._set(w)
        if ids.numel() <= CHUNK:  # one chunk: 0 + g would add nothing but a pass over d values
            return self._grad_of(self._loss_sum(*self.data.batch(ids))) / ids.numel()
        total = torch.zeros(self.dim, dtype=torch.float32)
        for lo in range(0, ids.numel(), CHUNK):
            x, y = self.data.batch(ids[lo:lo + CHUNK])
            total += self._grad_of(self._loss_sum(x, y))
        return total / ids.numel()

    def split_mean_grads(self, w: torch.Tensor, kept: torch.Tensor, removed: torch.Tensor):
        """(mean_loss_grad(w, kept), mean_loss_grad(w, removed)) from one forward pass over both
        sets when they fit in one chunk (an exact DeltaGrad step needs both at the same weights);
        removed may be empty (its gradient is then None)."""
        if removed.numel() == 0:
            return self.mean_loss_grad(w, kept), None
        if kept.numel() + removed.numel() > CHUNK or kept.numel() == 0:
            return self.mean_loss_grad(w, kept), self.mean_loss_grad(w, removed)
        self._set(w)
        x, y = self.data.batch(torch.cat([kept, removed]))
        losses = self.data.loss(self.module(x), y)
        k = kept.numel()
        g_kept = self._grad_of(losses[:k].sum(), retain_graph=True) / k
        g_removed = self._grad_of(losses[k:].sum()) / removed.numel()
        return g_kept, g_removed
