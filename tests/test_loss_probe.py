"""The first step's comparison with retraining's gradient (loss_probe.py) on its own: the streamed
distance equals the one from materialized gradients, the recomputation leaves no trace (p.grad,
BatchNorm statistics, torch's, numpy's and Python's RNG), and what it refuses or lets pass."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from unlearn_ext.loss_probe import FLOAT64_CHUNK, check_first_step, distance_of_recomputed, \
    recomputed_gradients, relative_difference


def setup(dropout=0.0):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 3),
                          nn.Linear(3, 3))  # the last layer is left out of the loss below: unused
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    params = list(model.parameters())
    loss = lambda: nn.functional.cross_entropy(model[:5](x), y)  # noqa: E731
    return model, params, loss


def test_the_streamed_distance_is_the_materialized_one_unused_parameters_included():
    model, params, loss = setup(dropout=0.5)
    reference = recomputed_gradients(params, model, loss, seed=None)
    assert reference[-1].abs().sum() == 0 and reference[0].abs().sum() > 0
    other = recomputed_gradients(params, model, loss, seed=1)
    reference[-1] = torch.ones_like(reference[-1])  # so that an unused parameter's term counts
    assert distance_of_recomputed(reference, params, model, loss, seed=1) == pytest.approx(
        relative_difference(other, reference), rel=1e-12)


def test_the_recomputation_leaves_no_trace():
    model, params, batch_loss = setup(dropout=0.5)

    def loss():  # loading a batch may draw from numpy's and Python's generators too
        np.random.rand()
        random.random()
        return batch_loss()

    loss().backward()
    grads = [None if p.grad is None else p.grad.clone() for p in params]
    buffers = [b.clone() for b in model.buffers()]
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    check_first_step(params, [p.grad if p.grad is not None else torch.zeros_like(p) for p in params], {}, model, loss)
    assert all((a is None and p.grad is None) or torch.equal(a, p.grad) for a, p in zip(grads, params))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert torch.equal(states[0], torch.get_rng_state())
    assert np.array_equal(states[1], np.random.get_state()[1]) and states[2] == random.getstate()


@pytest.mark.parametrize("scale, refused", [(1.0, False), (1.0005, False), (1.01, True), (4.0, True)])
def test_a_scaled_gradient_is_refused_above_the_tolerance(scale, refused):
    model, params, loss = setup()
    loop = [g * scale for g in recomputed_gradients(params, model, loss, seed=None)]
    if refused:
        with pytest.raises(RuntimeError, match=f"about {scale:.4g} times it"):
            check_first_step(params, loop, {}, model, loss)
    else:
        check_first_step(params, loop, {}, model, loss)


def test_random_gradients_are_not_judged():
    model, params, loss = setup(dropout=0.5)
    loop = [g * 4 for g in recomputed_gradients(params, model, loss, seed=None)]
    check_first_step(params, loop, {}, model, loss)  # two recomputations disagree: no verdict


class LargestFloat64(TorchDispatchMode):
    """The most elements of any float64 tensor an op makes while active."""

    def __init__(self):
        super().__init__()
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                self.most = max(self.most, t.numel())
        return out


def test_the_comparison_takes_no_whole_large_gradient_to_float64():
    """Its float64 sums go a chunk at a time: whole tensors in float64 (with their difference and
    square) held about eight times the largest gradient's float32 size at once, at the first step
    of a large model. A 3-chunk layer here; a scaled loss must still be refused."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 3 * FLOAT64_CHUNK // 1024), nn.Tanh(), nn.Linear(3 * FLOAT64_CHUNK // 1024, 2))
    x, y = torch.randn(4, 1024), torch.randint(0, 2, (4,))
    params = list(model.parameters())
    loss = lambda: nn.functional.cross_entropy(model(x), y)  # noqa: E731
    loop = [g * 2 for g in recomputed_gradients(params, model, loss, seed=None)]
    watch = LargestFloat64()
    with watch, pytest.raises(RuntimeError, match="about 2 times it"):
        check_first_step(params, loop, {}, model, loss)
    assert 0 < watch.most <= FLOAT64_CHUNK
