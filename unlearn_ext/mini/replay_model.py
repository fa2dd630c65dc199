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
them, on a model with BatchNorm in eval mode among others). A model made of Linear layers and
elementwise activations under the default cross-entropy takes its backward pass without autograd's
graph (mini/layer_chain.py: the same arithmetic, about half the calls; tests/test_layer_chain.py);
rows read from a dataset are checked batch by batch before the chain takes them.
`batch_rows` reads the rows of a replay's many small id sets ahead, in blocks.

Across ranks (distributed/history_methods.py) the flat model is a RankSplitFlatModel: each gradient
over a set of ids is then taken by every rank on its slice of the ids (`mine`, the flat model's
`my_ids`) and the ranks' sums are added in rank order (its `sum_over_ranks`), as that model's own
`mean_loss_grad` does; in one process the slice is every id and the sum is the process's own, so
the arithmetic above is unchanged. Whether a set is empty, or the sets fit in one chunk, is decided
on the whole set (the same decision on every rank, so every rank joins the same collectives).
"""
from __future__ import annotations

import copy

import torch

from .layer_chain import LayerChain
from .vectors import CHUNK, FlatModel


class ReplayModel:
    def __init__(self, flat: FlatModel):
        # A copy, so that the user's model (its parameters, .grad and training flags) is never
        # touched; retraining deep-copies the model the same way, so any model it accepts works here.
        self.data = flat.data
        self._my_ids, self._sum_over_ranks = flat.my_ids, flat.sum_over_ranks  # (module docstring: across ranks)
        self.module = copy.deepcopy(flat.model).eval()
        self.params = [self.module.get_parameter(name) for name in flat.names]
        self.dtype = self.params[0].dtype if self.params else torch.float32
        self.weights = torch.zeros(flat.dim, dtype=self.dtype)
        for p, view in zip(self.params, torch.split(self.weights, flat.sizes)):
            p.data = view.view(p.shape)  # every parameter now reads the flat buffer
            p.grad = None
        self.dim = flat.dim
        # Models of Linear layers and elementwise activations: the backward pass without autograd's
        # graph (mini/layer_chain.py); None: autograd.
        self.chain = LayerChain.of(self.module, self.params, self.data)
        # One process: the flat model's sets are its own and its sums need no other rank's.
        self._one_process = (type(flat).my_ids is FlatModel.my_ids
                             and type(flat).sum_over_ranks is FlatModel.sum_over_ranks)

    def run_arguments(self):
        """(chain_weights, grad, shapes, layers): what ops.deltagrad_qn_run_ needs to take a run's
        removed rows' gradients as mean_loss_grad does (the weights copied into this copy's flat
        buffer, the chain's own output vector), or None where that op does not cover this model: a
        float32 chain on in-memory rows (checked once, LayerChain.of), in one process."""
        chain = self.chain
        if chain is None or not self._one_process or not chain.rows_checked or chain.dtype != torch.float32:
            return None
        shapes = [n for weight, bias in zip(chain.weights, chain.biases)
                  for n in (weight.shape[0], weight.shape[1], int(bias is not None))]
        return self.weights, chain.outputs[0], shapes, chain.layers

    def _set(self, w: torch.Tensor) -> None:
        self.weights.copy_(w.detach())

    def _grad_of(self, loss: torch.Tensor, retain_graph: bool = False) -> torch.Tensor:
        grads = torch.autograd.grad(loss, self.params, retain_graph=retain_graph, allow_unused=True,
                                    materialize_grads=True)
        return self._flat(grads)

    def _loss_sum(self, x, y) -> torch.Tensor:
        return self.data.loss(self.module(x), y).sum()

    def _flat(self, grads) -> torch.Tensor:
        return torch.cat([g.reshape(-1) for g in grads]).float()

    def _rows(self, ids: torch.Tensor, rows, lo: int, hi: int):
        """(inputs, targets) of ids[lo:hi]: sliced from `rows` (those of all of ids) when given, else read."""
        if rows is None:
            return self.data.batch(ids[lo:hi])
        if lo == 0 and hi >= len(rows[0]):  # all of them (one chunk): no slices to make
            return rows
        return rows[0][lo:hi], rows[1][lo:hi]

    def _chain_takes(self, x, y) -> bool:
        """Whether the chain computes the gradient of rows (x, y) (LayerChain.takes: a dataset's rows
        are checked batch by batch). A batch it does not take leaves the rest of the request to
        autograd, which computes, or refuses, such rows as it always did."""
        if self.chain is not None and not self.chain.takes(x, y):
            self.chain = None
        return self.chain is not None

    def _loss_grad_sums(self, x, y) -> torch.Tensor:
        if self._chain_takes(x, y):
            return self.chain.loss_grad_sums(x, y).float()  # (the chain's own vector: used before the next call)
        return self._grad_of(self._loss_sum(x, y))

    def mine(self, ids: torch.Tensor) -> torch.Tensor:
        """The ids of a set whose rows this process reads: all of them in one process, the rank's
        slice across ranks (module docstring). What `rows` arguments hold the rows of."""
        return self._my_ids(ids)

    def _grad_sum(self, mine: torch.Tensor, rows) -> torch.Tensor:
        """The summed per-sample loss gradients over ids `mine` (float32, this process's share;
        zeros for none) at the weights set last. rows: theirs, or None to read them here."""
        if mine.numel() == 0:
            return torch.zeros(self.dim, dtype=torch.float32)
        if mine.numel() <= CHUNK:  # one chunk: 0 + g would add nothing but a pass over d values
            return self._loss_grad_sums(*self._rows(mine, rows, 0, mine.numel()))
        total = torch.zeros(self.dim, dtype=torch.float32)
        for lo in range(0, mine.numel(), CHUNK):
            total += self._loss_grad_sums(*self._rows(mine, rows, lo, lo + CHUNK))
        return total

    def _mean(self, local_sum: torch.Tensor, count: int) -> torch.Tensor:
        """Every process's sum added (sum_over_ranks) and divided by the set's size, float32."""
        return (self._sum_over_ranks(local_sum) / count).float()

    def mean_loss_grad(self, w: torch.Tensor, ids: torch.Tensor, rows=None) -> torch.Tensor:
        """grad of (1/|ids|) sum_{i in ids} l_i(w), float32, without weight decay (as
        FlatModel.mean_loss_grad). Empty ids give zeros. rows: (inputs, targets) of mine(ids) when
        the caller has them already (batch_rows), else read here."""
        if ids.numel() == 0:  # decided on the whole set: the same on every rank, no collective
            return torch.zeros(self.dim, dtype=torch.float32)
        self._set(w)
        return self._mean(self._grad_sum(self.mine(ids), rows), ids.numel())

    def split_mean_grads(self, w: torch.Tensor, kept: torch.Tensor, removed: torch.Tensor, rows=None):
        """(mean_loss_grad(w, kept), mean_loss_grad(w, removed)) from one forward pass over both
        sets when they fit in one chunk (an exact DeltaGrad step needs both at the same weights);
        removed may be empty (its gradient is then None). rows: (inputs, targets) of mine(kept)
        then mine(removed), when the caller has them already (batch_rows)."""
        if removed.numel() == 0:
            return self.mean_loss_grad(w, kept, rows), None
        my_kept, my_removed = self.mine(kept), self.mine(removed)
        if kept.numel() + removed.numel() > CHUNK or kept.numel() == 0:
            k = my_kept.numel()
            both = None if rows is None else ((rows[0][:k], rows[1][:k]), (rows[0][k:], rows[1][k:]))
            return (self.mean_loss_grad(w, kept, both and both[0]),
                    self.mean_loss_grad(w, removed, both and both[1]))
        self._set(w)
        g_kept, g_removed = self._split_grad_sums(my_kept, my_removed, rows)
        return self._mean(g_kept, kept.numel()), self._mean(g_removed, removed.numel())

    def _split_grad_sums(self, my_kept: torch.Tensor, my_removed: torch.Tensor, rows):
        """The summed loss gradients over my_kept and over my_removed (float32; zeros for none) from
        one forward pass over both, at the weights set last. rows: theirs (kept first), or None."""
        k = my_kept.numel()
        if k + my_removed.numel() == 0:  # a rank whose slices are both empty still joins the sums
            return torch.zeros(self.dim, dtype=torch.float32), torch.zeros(self.dim, dtype=torch.float32)
        x, y = self.data.batch(torch.cat([my_kept, my_removed])) if rows is None else rows
        if self._chain_takes(x, y):
            g_kept, g_removed = self.chain.loss_grad_sums(x, y, split=k)
            return g_kept.float(), g_removed.float()
        losses = self.data.loss(self.module(x), y)
        return self._grad_of(losses[:k].sum(), retain_graph=True), self._grad_of(losses[k:].sum())


def batch_rows(data, sets: list):
    """Yields (inputs, targets) of each id set in `sets`, in order. In-memory data are read ahead in
    blocks of up to CHUNK rows, one `data.batch` per block instead of one per set (a replay reads a
    few rows at each of many steps); other data set by set (a block of loaded items costs the same)."""
    if not data.in_memory:
        for ids in sets:
            yield data.batch(ids) if ids.numel() else None  # (a rank's empty slice: nothing to read)
        return
    start = 0
    while start < len(sets):
        stop, total = start + 1, int(sets[start].numel())
        while stop < len(sets) and total + sets[stop].numel() <= CHUNK:
            total += int(sets[stop].numel())
            stop += 1
        sizes = [int(s.numel()) for s in sets[start:stop]]
        x, y = data.batch(torch.cat(sets[start:stop]))
        yield from zip(x.split(sizes), y.split(sizes))
        start = stop
