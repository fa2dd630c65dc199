"""What users do with loaders besides training: peek at a batch before the loop to check shapes,
evaluate over the training loader, validate on a loader of their own between epochs (which draws
a seed from torch's RNG, and with dropout left on draws masks). None of it may shift what the
loop trains: each pass of the wrapped loader starts at the loop's next optimizer step, and
retraining starts each epoch from the RNG state the loop had there, so it still reproduces the
loop bit for bit (before, a peek made the loop train epochs 1..E while retraining and the history
assumed 0..E-1, and a validation pass changed every later dropout mask)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import unlearn_ext as ue
from unlearn_ext.pcmu import PCMUTrainer
from user_models import LazyImages, cnn, same_state

N, BATCH, EPOCHS = 48, 16, 3


def wrap(method, dropout=0.0):
    torch.manual_seed(0)
    model = cnn("group", dropout=dropout)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = torch.utils.data.DataLoader(LazyImages(N), batch_size=BATCH, shuffle=True)
    engine = ue.UnlearningEngine()
    options = {"clip_norm": 1.0, "tau": 0.006, "sigma": 0.01} if method == "pcmu" else {}
    return engine, *engine.make_unlearnable(model, optimizer, loader, method=method, epochs=EPOCHS, **options)


def train_epoch(model, optimizer, loader):
    model.train()
    for x, y in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


@pytest.mark.parametrize("method", ["retrain", "deltagrad", "pcmu"])
def test_a_peek_at_one_batch_before_training_does_not_shift_the_epochs(method):
    engine, model, optimizer, loader = wrap(method)
    x, y = next(iter(loader))  # the shapes, as users check them
    assert x.shape[0] == BATCH
    for _ in range(EPOCHS):
        train_epoch(model, optimizer, loader)
    if method == "pcmu":  # its own step: the run must be PCMUTrainer's over the schedule from step 0
        reference = PCMUTrainer(copy.deepcopy(engine.initial), None, engine.data, batch_size=BATCH, seed=0, lr=0.05, clip_norm=1.0,
                                tau=0.006, sigma=0.01)
        assert same_state(reference.train(epochs=EPOCHS).model, model)
    else:
        assert same_state(ue.retrain(engine.initial, engine.data, engine.recipe, []), model)
    engine.unlearner()  # the loop kept to the recipe


def test_an_evaluation_over_the_training_loader_between_epochs_trains_nothing_and_shifts_nothing():
    engine, model, optimizer, loader = wrap("retrain")
    for _ in range(EPOCHS):
        train_epoch(model, optimizer, loader)
        model.eval()
        with torch.no_grad():
            correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
        assert 0 <= correct <= N
    assert same_state(ue.retrain(engine.initial, engine.data, engine.recipe, []), model)


@pytest.mark.parametrize("validation_mode", ["eval", "train"])
def test_a_validation_loader_between_epochs_leaves_retraining_bit_for_bit(validation_mode):
    """Iterating any DataLoader draws its seed from torch's RNG; a validation pass left in training
    mode draws dropout masks too. Retraining starts each epoch from the loop's own RNG state."""
    engine, model, optimizer, loader = wrap("retrain", dropout=0.3)
    validation = torch.utils.data.DataLoader(LazyImages(16), batch_size=8)
    for _ in range(EPOCHS):
        train_epoch(model, optimizer, loader)
        model.train(validation_mode == "train")
        with torch.no_grad():
            for x, _ in validation:
                model(x)
    assert same_state(ue.retrain(engine.initial, engine.data, engine.recipe, []), model)
