"""The user's loop under DistributedDataParallel, 2 gloo ranks: a step that leaves the recipe on one
rank only (its learning rate set by hand, its model left in eval mode after a validation pass) is
refused at that step on every rank, naming the rank and the reason -- promptly, not after the
other rank waited in the next step's gradient all-reduce until the group's timeout. Each rank stays
up until every rank has finished its loop (as a job whose launcher does not end the other ranks when
one raises, or a rank that catches the error): a rank that exited at once would close its
connections and fail the waiting rank's all-reduce early, hiding the wait."""
from __future__ import annotations

import os
import tempfile
import time

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import unlearn_ext as ue

from distributed_setup import GROUP_TIMEOUT_S, launch
from user_models import scaled_step

TIMEOUT_S = 90
N, BATCH, EPOCHS = 96, 48, 2  # 4 steps: a refusal at step 1 leaves the other rank steps to wait in
LEAVING_STEP, LEAVING_RANK = 1, 1


def _dataset():
    g = torch.Generator().manual_seed(5)
    y = torch.randint(0, 3, (N,), generator=g)
    return torch.utils.data.TensorDataset(torch.randn(N, 6, generator=g), y)


def _leave_the_recipe(how: str, model: nn.Module, optimizer) -> None:
    if how == "lr":
        optimizer.param_groups[0]["lr"] = 0.05
    elif how == "eval":  # e.g. a validation pass on one rank without model.train() after it
        model.eval()


def _stay_until_every_rank_finished(directory: str, world: int) -> None:
    store = torch.distributed.FileStore(os.path.join(directory, "finished"), world)
    store.add("finished", 1)
    deadline = time.monotonic() + TIMEOUT_S
    while store.add("finished", 0) < world and time.monotonic() < deadline:
        time.sleep(0.05)


def _timed_outcome(loop, directory: str, world: int) -> tuple[str, float]:
    """(what loop() raised, or 'no error'; its seconds), once every rank has finished its loop."""
    began = time.monotonic()
    try:
        loop()
        outcome = "no error"
    except Exception as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    seconds = time.monotonic() - began
    _stay_until_every_rank_finished(directory, world)
    return outcome, seconds


def leaving_worker(rank, world, directory, how):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    trained = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    loader = torch.utils.data.DataLoader(_dataset(), batch_size=BATCH, shuffle=True)
    engine = ue.UnlearningEngine()
    trained, optimizer, loader = engine.make_unlearnable(
        trained, optimizer, loader, method="mini", epochs=EPOCHS, loss_fn=loss_fn,
        history=os.path.join(directory, "anchors"), anchors=2)

    def loop():
        step = 0
        for _ in range(EPOCHS):
            for x, y in loader:
                optimizer.zero_grad()
                loss_fn(trained(x), y).backward()
                if rank == LEAVING_RANK and step == LEAVING_STEP:
                    _leave_the_recipe(how, trained, optimizer)
                optimizer.step()
                step += 1
    return _timed_outcome(loop, directory, world)


@pytest.mark.parametrize("how, reason", [
    ("lr", "at optimizer step 1 the optimizer's learning rates are [0.05], the recipe's schedule gives [0.1]"),
    ("eval", "optimizer step 1: modules (model), 0, 1, 2 are in another training mode than at step 0"),
])
def test_one_rank_leaving_the_recipe_is_refused_on_every_rank_without_waiting(how, reason):
    with tempfile.TemporaryDirectory() as directory:
        got = launch(leaving_worker, 2, TIMEOUT_S, directory, how)
    for rank, (message, seconds) in enumerate(got):
        assert message.startswith(f"DistributedRefusal: rank(s) [{LEAVING_RANK}] refused optimizer step "
                                  f"{LEAVING_STEP}: rank {LEAVING_RANK}: RuntimeError: {reason}"), (rank, message)
        assert seconds < GROUP_TIMEOUT_S / 2, (rank, seconds)


def one_rank_declaring_worker(rank, world, directory):
    """A GradScaler loop on both ranks whose scaler is declared (grad_scaler=) on rank 1 only, and
    whose second batch's loss is infinite: every rank's scaler skips that step, and only rank 1's
    guard knows it."""
    torch.manual_seed(0)
    trained = DistributedDataParallel(nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)))
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(_dataset(), batch_size=BATCH // 2, shuffle=True)
    scaler = torch.amp.GradScaler("cpu")
    engine = ue.UnlearningEngine()
    trained, optimizer, loader = engine.make_unlearnable(
        trained, optimizer, loader, method="deltagrad", epochs=EPOCHS, loss_fn=nn.CrossEntropyLoss(),
        history=os.path.join(directory, "history"), grad_scaler=scaler if rank == 1 else None)

    def loop():
        batches = 0
        for _ in range(EPOCHS):
            for x, y in loader:
                scaled_step(trained, optimizer, scaler, x, y, infinite_loss=batches == 1)
                batches += 1
    return _timed_outcome(loop, directory, world)


def test_a_skip_only_one_ranks_declared_scaler_sees_is_refused_on_every_rank_without_waiting():
    """The skip check is one of the checks whose input (the declared scaler) can differ between
    ranks: it is agreed with the others. Before: rank 1 refused alone, before the agreement, and
    rank 0 waited in it until the group's timeout."""
    with tempfile.TemporaryDirectory() as directory:
        got = launch(one_rank_declaring_worker, 2, TIMEOUT_S, directory)
    for rank, (message, seconds) in enumerate(got):
        assert message.startswith("DistributedRefusal: rank(s) [1] refused optimizer step 1: rank 1: RuntimeError: "
                                  "optimizer step 1 was skipped by the GradScaler"), (rank, message)
        assert seconds < GROUP_TIMEOUT_S / 2, (rank, seconds)
