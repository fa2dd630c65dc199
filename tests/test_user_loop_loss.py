"""The loss the user's loop backpropagates must be the loss given to make_unlearnable, on the
loader's batch, unscaled: retraining steps on loss_fn(model(x), y).backward(). A scaled loss, a
term added to it or inputs changed in the loop make one backward per step with untouched
gradients, which no count of passes or writes sees; the first step's gradients are compared with
retraining's own (loss_probe.py) and such a loop is refused there, before its update. GradScaler
unscales before the step and passes; a model whose gradients are random (dropout) cannot be judged
and passes too (the control that the comparison never refuses what it cannot tell)."""
from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
from torch import nn

import unlearn_ext as ue
from user_models import Augmented, LazyImages, LazyTokens, cnn, same_state

N, BATCH, EPOCHS = 48, 16, 2


def wrap(method, model=None, dataset=None, **options):
    torch.manual_seed(0)
    model = cnn("group") if model is None else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = torch.utils.data.DataLoader(LazyImages(N) if dataset is None else dataset, batch_size=BATCH,
                                         shuffle=True)
    engine = ue.UnlearningEngine()
    return engine, *engine.make_unlearnable(model, optimizer, loader, method=method, epochs=EPOCHS,
                                            loss_fn=nn.CrossEntropyLoss(), **options)


def loop(model, optimizer, loader, backward=lambda loss, model, x: loss.backward(), inputs=lambda x: x):
    for _ in range(EPOCHS):
        for x, y in loader:
            optimizer.zero_grad()
            x = inputs(x)
            backward(nn.functional.cross_entropy(model(x), y), model, x)
            optimizer.step()


def l2_penalty(loss, model, x):
    (loss + 1e-2 * sum(p.square().sum() for p in model.parameters())).backward()


LEAVING = {
    "scaled loss": ({"backward": lambda loss, model, x: (loss * 4).backward()}, "about 4 times it"),
    "a penalty added": ({"backward": l2_penalty}, "relative difference"),
    "inputs changed in the loop": ({"inputs": lambda x: x / 2}, "relative difference"),
}


@pytest.mark.parametrize("method", ["retrain", "topk", "mini", "deltagrad"])
@pytest.mark.parametrize("case", list(LEAVING))
def test_a_loop_backpropagating_another_loss_is_refused_at_the_first_step(method, case):
    change, message = LEAVING[case]
    engine, model, optimizer, loader = wrap(method)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match=f"optimizer step 0: the loop's gradients are not those of the loss.*"
                                           f"{message}"):
        loop(model, optimizer, loader, **change)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # before its update


def test_a_grad_scaler_loop_is_accepted_and_repeated_by_retraining():
    """GradScaler scales the loss by a power of two and unscales the gradients before the step: the
    step takes the loss's own gradients."""
    engine, model, optimizer, loader = wrap("retrain")
    scaler = torch.amp.GradScaler("cpu")
    for _ in range(EPOCHS):
        for x, y in loader:
            optimizer.zero_grad()
            scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
            scaler.step(optimizer)
            scaler.update()
    engine.unlearner()
    assert same_state(ue.retrain(engine.initial, engine.data, engine.recipe, []), model)


class RunningCentering(nn.Module):
    """Centers its input by a running mean that its forward updates (in training mode) before using
    it: the output depends on the buffer's value before the forward."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.zeros(()))

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                self.mean.mul_(0.9).add_(0.1 * x.mean())
        return x - self.mean


@pytest.mark.parametrize("case", ["dropout", "seeded augmentation", "frozen batchnorm", "training batchnorm",
                                  "a buffer updated before use"])
def test_the_plain_loop_passes_where_gradients_are_random_or_buffers_move(case):
    """Controls: dropout (two recomputations disagree: not judged), augmentation seeded per (epoch,
    item) (recomputed as retraining loads it), BatchNorm in eval mode and in training mode (its
    running statistics are put back after each recomputation), a forward that updates a buffer
    before using it (recomputed from the buffers the loop's forward started from: from those it
    left, this loop was refused as another loss)."""
    if case == "a buffer updated before use":
        engine, model, optimizer, loader = wrap("retrain", model=nn.Sequential(RunningCentering(), cnn("group")))
    elif case == "dropout":
        engine, model, optimizer, loader = wrap("retrain", model=cnn("group", dropout=0.3))
    elif case == "seeded augmentation":
        engine, model, optimizer, loader = wrap("retrain", dataset=Augmented(LazyImages(N)), augmentation_seed=3)
    else:
        model = cnn("batch").train(case == "training batchnorm")
        engine, model, optimizer, loader = wrap("retrain", model=model)
    loop(model, optimizer, loader)
    engine.unlearner()
    assert same_state(ue.retrain(engine.initial, engine.data, engine.recipe, []), model)


class GlobalRNGFlips(torch.utils.data.Dataset):
    """LazyImages flipped at random by numpy's or Python's global generator, unseeded: not repeated
    by retraining (README), but a loop over it is the plain recipe and must not be refused."""

    def __init__(self, base, draw):
        self.base, self.draw = base, draw

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return (x.flip(-1) if self.draw() < 0.5 else x), y


@pytest.mark.parametrize("draw", [np.random.rand, random.random], ids=["numpy", "python"])
def test_augmentation_from_numpy_or_python_is_not_judged(draw):
    """The two recomputations must run under different states of every generator a dataset may draw
    from: with torch's alone reseeded they agreed with each other and not with the loop's batch,
    and this plain loop was refused as another loss."""
    np.random.seed(0)
    random.seed(0)
    engine, model, optimizer, loader = wrap("retrain", dataset=GlobalRNGFlips(LazyImages(N), draw))
    loop(model, optimizer, loader)
    engine.unlearner()


class CheckpointedMiddle(nn.Module):
    """A CNN whose middle block runs under activation checkpointing, as large models do."""

    def __init__(self, reentrant: bool):
        super().__init__()
        self.first, self.reentrant = nn.Conv2d(1, 4, 3, padding=1), reentrant
        self.middle = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Tanh())
        self.last = nn.Sequential(nn.Flatten(), nn.Linear(256, 3))

    def forward(self, x):
        return self.last(torch.utils.checkpoint.checkpoint(self.middle, self.first(x), use_reentrant=self.reentrant))


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_loop_with_activation_checkpointing_is_accepted(reentrant):
    """Reentrant checkpointing refuses torch.autograd.grad, which the recomputation uses: the plain
    loop is not judged there (it raised the checkpoint's RuntimeError at the first step)."""
    engine, model, optimizer, loader = wrap("retrain", model=CheckpointedMiddle(reentrant))
    loop(model, optimizer, loader)
    engine.unlearner()
    assert same_state(ue.retrain(engine.initial, engine.data, engine.recipe, []), model)


def test_a_scaled_loss_is_not_judged_where_the_gradients_are_random():
    """What the comparison cannot tell, documented: with dropout on, a scaled loss passes."""
    engine, model, optimizer, loader = wrap("retrain", model=cnn("group", dropout=0.3))
    loop(model, optimizer, loader, backward=lambda loss, model, x: (loss * 4).backward())
    engine.unlearner()


@pytest.mark.parametrize("scale, refused", [(1, False), (4, True)])
def test_a_mixed_precision_loop_is_compared_under_its_own_autocast(scale, refused):
    """torch.autocast around the loop's forward is the loop's arithmetic: the recomputation runs
    under the autocast the loop's forward ran under, so the plain loop passes (it was refused, a
    relative difference of bf16's rounding) and a scaled loss is still refused."""
    engine, model, optimizer, loader = wrap("retrain")

    def backward(loss, model, x):
        (loss * scale).backward()

    def autocast_loop():
        for _ in range(EPOCHS):
            for x, y in loader:
                optimizer.zero_grad()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = nn.functional.cross_entropy(model(x), y)
                backward(loss, model, x)
                optimizer.step()

    if refused:
        with pytest.raises(RuntimeError, match="about 4 times it"):
            autocast_loop()
    else:
        autocast_loop()
        engine.unlearner()


class ProjectedCrossEntropy(nn.Module):
    """Cross-entropy after a fixed projection of the outputs (a matmul, which autocast runs in bf16)."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = reduction
        self.register_buffer("projection", torch.randn(3, 3, generator=torch.Generator().manual_seed(1)))

    def forward(self, outputs, targets):
        return nn.functional.cross_entropy(outputs @ self.projection, targets, reduction=self.reduction)


def test_a_loop_computing_its_loss_outside_autocast_is_accepted():
    """autocast around the forward only, the loss after it in float32: the recomputation, under the
    autocast throughout, differs by bf16 roundings, within the autocast dtype's tolerance (it was
    held to float32's 1e-3 and refused at 3.7e-3)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 3))
    loss_fn = ProjectedCrossEntropy()
    engine = ue.UnlearningEngine()
    model, optimizer, loader = engine.make_unlearnable(
        model, torch.optim.SGD(model.parameters(), lr=0.05),
        torch.utils.data.DataLoader(LazyImages(N), batch_size=BATCH, shuffle=True), method="retrain", epochs=EPOCHS,
        loss_fn=loss_fn)
    for _ in range(EPOCHS):
        for x, y in loader:
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                outputs = model(x)
            loss_fn(outputs.float(), y).backward()
            optimizer.step()
    engine.unlearner()


class SparseBag(nn.Module):
    """Mean of token embeddings with sparse gradients (nn.Embedding(sparse=True)), then a linear layer."""

    def __init__(self):
        super().__init__()
        self.embedding, self.linear = nn.Embedding(12, 8, sparse=True), nn.Linear(8, 2)

    def forward(self, tokens):
        return self.linear(self.embedding(tokens).mean(1))


@pytest.mark.parametrize("scale", [1, 4])
def test_sparse_gradients_are_compared(scale):
    """The comparison's hook and sums take sparse gradients: the plain loop passes and is repeated,
    a scaled loss is refused (the hook's expand raised 'expand is unsupported for Sparse tensors'
    at the first step of the plain loop)."""
    torch.manual_seed(0)
    model = SparseBag()
    engine = ue.UnlearningEngine()
    model, optimizer, loader = engine.make_unlearnable(
        model, torch.optim.SGD(model.parameters(), lr=0.05),
        torch.utils.data.DataLoader(LazyTokens(N), batch_size=BATCH, shuffle=True), method="retrain", epochs=EPOCHS,
        loss_fn=nn.CrossEntropyLoss())

    def train():
        for _ in range(EPOCHS):
            for x, y in loader:
                optimizer.zero_grad()
                (nn.functional.cross_entropy(model(x), y) * scale).backward()
                optimizer.step()

    if scale != 1:
        with pytest.raises(RuntimeError, match="about 4 times it"):
            train()
        return
    train()
    engine.unlearner()
    assert same_state(ue.retrain(engine.initial, engine.data, engine.recipe, []), model)
