"""The user's own loop with momentum SGD through `UnlearningEngine.make_unlearnable`: a small CNN
with GroupNorm, a map-style Dataset and a DataLoader; Mini-Unlearning and DeltaGrad are judged
against the library's retraining of the same recipe, never against themselves."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import unlearn_ext as ue
from unlearn_ext.data import retrain
from unlearn_ext.mini.vectors import FlatModel
from unlearn_ext.evaluate.pcmu_examples import load
from unlearn_ext.policy import UnsupportedModelError

EPOCHS = 6


class DigitImages(Dataset):
    """sklearn's 8x8 digits as 1x8x8 images: a map-style dataset of (image, label) pairs."""

    def __init__(self, count: int):
        x, y, _, _ = load("digits")
        self.x, self.y = x[:count].reshape(-1, 1, 8, 8), y[:count]

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def small_cnn(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.GroupNorm(2, 4), torch.nn.Tanh(), torch.nn.AvgPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 10))


def users_run(method: str, nesterov: bool, **options):
    """The user's objects and loop, unchanged but for the one wrapping call."""
    model = small_cnn(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    loader = DataLoader(DigitImages(300), batch_size=32, shuffle=True)
    loss_fn = torch.nn.CrossEntropyLoss()
    engine = ue.UnlearningEngine()
    model, optimizer, loader = engine.make_unlearnable(model, optimizer, loader, method=method, epochs=EPOCHS,
                                                       loss_fn=loss_fn, scheduler=scheduler, seed=3, **options)
    for _ in range(EPOCHS):
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
        scheduler.step()
    return engine, model


def flat(model, engine):
    return FlatModel(model, engine.data).flat()


def forget_five_percent(engine):
    return engine.data.ids[torch.randperm(len(engine.data), generator=torch.Generator().manual_seed(7))[:15]]


@pytest.mark.parametrize("nesterov", [False, True], ids=["heavy-ball", "nesterov"])
@pytest.mark.parametrize("method", ["mini", "deltagrad"])
def test_users_momentum_loop_unlearns_toward_retraining(method, nesterov):
    """Measured d/d0: Mini 0.86 (heavy ball) / 0.89 (Nesterov), DeltaGrad 0.58 / 0.57."""
    engine, model = users_run(method, nesterov)
    original = copy.deepcopy(model)
    forgotten = forget_five_percent(engine)
    report = engine.unlearner().unlearn(forgotten)
    retrained = retrain(engine.run.initial, engine.data, engine.recipe, forgotten)
    w, w0, wr = flat(model, engine), flat(original, engine), flat(retrained, engine)
    d_d0 = float((w - wr).norm() / (w0 - wr).norm())
    assert report.status == "unlearned", report.reason
    assert report.details["momentum"] == 0.9 and report.details["nesterov"] == nesterov
    assert d_d0 < 1


@pytest.mark.parametrize("method, force", [("mini", {"loss_rise_limit": -1.0}),
                                           ("deltagrad", {"max_prediction_error": 0.0})])
def test_users_momentum_loop_fallback_is_the_recipes_retraining(method, force):
    """A check forced to fire: both methods' fallback steps torch's own optimizer from step 0 (bit for
    bit the recipe's retraining)."""
    engine, model = users_run(method, True, **force)
    forgotten = forget_five_percent(engine)
    report = engine.unlearner().unlearn(forgotten)
    assert report.status == "fallback"
    retrained = flat(retrain(engine.run.initial, engine.data, engine.recipe, forgotten), engine)
    assert torch.equal(flat(model, engine), retrained)


@pytest.mark.parametrize("make, match", [
    (lambda p: torch.optim.Adam(p, lr=0.1), "Adam.*nonlinearly"),
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.5), "dampening=0.5"),
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=1.0), "momentum in \\[0, 1\\)"),
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, maximize=True), "maximize=True"),
    (lambda p: torch.optim.SGD([{"params": p[:2], "momentum": 0.9}, {"params": p[2:]}], lr=0.1, momentum=0.5),
     "one momentum"),
    (lambda p: torch.optim.SGD([{"params": p[:2], "lr": 0.2}, {"params": p[2:]}], lr=0.1, momentum=0.9), "one lr"),
])
@pytest.mark.parametrize("method", ["mini", "deltagrad"])
def test_unreplayable_optimizer_refused_before_training(method, make, match):
    model = small_cnn(0)
    optimizer = make(list(model.parameters()))
    with pytest.raises(UnsupportedModelError, match=match):
        ue.UnlearningEngine().make_unlearnable(model, optimizer, DigitImages(40), batch_size=8, method=method,
                                               epochs=1)
    assert not optimizer.state  # nothing ran
