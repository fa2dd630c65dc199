"""The user's loop under DistributedDataParallel, 2 gloo ranks: the training modes step 0 records
(the recipe's, which retraining trains in) must be the same on every rank. A rank whose model has
a module in eval mode while the other's trains is refused at the first optimizer step, on every
rank, naming that module; the same modes on every rank (eval included) train as before."""
from __future__ import annotations

import os
import tempfile
import time

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import unlearn_ext as ue

from distributed_setup import GROUP_TIMEOUT_S, launch

TIMEOUT_S = 90
N, BATCH = 96, 48


def _dataset():
    g = torch.Generator().manual_seed(5)
    y = torch.randint(0, 3, (N,), generator=g)
    return torch.utils.data.TensorDataset(torch.randn(N, 6, generator=g), y)


def modes_worker(rank, world, directory, eval_on):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    for r, name in eval_on:
        if r == rank:
            model.get_submodule(name).eval()
    trained = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    loader = torch.utils.data.DataLoader(_dataset(), batch_size=BATCH, shuffle=True)
    engine = ue.UnlearningEngine()
    trained, optimizer, loader = engine.make_unlearnable(
        trained, optimizer, loader, method="mini", epochs=1, loss_fn=loss_fn,
        history=os.path.join(directory, "anchors"), anchors=2)
    began = time.monotonic()
    try:
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(trained(x), y).backward()
            optimizer.step()
        return "no error", time.monotonic() - began
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}", time.monotonic() - began


def test_ranks_in_different_training_modes_are_refused_at_step_0_naming_the_modules():
    with tempfile.TemporaryDirectory() as directory:
        got = launch(modes_worker, 2, TIMEOUT_S, directory, [(1, "2")])
    for rank, (message, seconds) in enumerate(got):
        assert message.startswith("DistributedRefusal: at optimizer step 0 the ranks' modules are in different "
                                  "training modes: 2 (train() on rank(s) [0], eval() on rank(s) [1])"), (rank, message)
        assert seconds < GROUP_TIMEOUT_S / 2, (rank, seconds)


def test_the_same_modes_on_every_rank_train():
    """A module in eval mode on every rank is a mode the recipe keeps (retraining repeats it)."""
    with tempfile.TemporaryDirectory() as directory:
        got = launch(modes_worker, 2, TIMEOUT_S, directory, [(0, "1"), (1, "1")])
    assert [message for message, _ in got] == ["no error", "no error"]
