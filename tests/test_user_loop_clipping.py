"""Gradient clipping in the user's loop, declared to make_unlearnable (clip_grad_norm=): retraining,
fine-tuning and repairs clip the same, so retraining still reproduces the loop bit for bit. The
loop must clip exactly as declared -- clip_grad_norm_(model.parameters(), max_norm) between
backward and step -- or the first step that does not is refused before its update. The history
methods and PCMU work from unclipped batch gradients and refuse the declaration when wrapping."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import unlearn_ext as ue
from unlearn_ext.data import BatchSchedule
from user_models import LazyImages, cnn, same_state

N, BATCH, EPOCHS, MAX_NORM = 48, 16, 2, 0.5
FORGET = [3, 17]


def wrap(method, clip_grad_norm=MAX_NORM):
    torch.manual_seed(0)
    model = cnn("group", dropout=0.2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loader = torch.utils.data.DataLoader(LazyImages(N), batch_size=BATCH, shuffle=True)
    engine = ue.UnlearningEngine()
    return engine, *engine.make_unlearnable(model, optimizer, loader, method=method, epochs=EPOCHS,
                                            clip_grad_norm=clip_grad_norm)


def clipping_loop(model, optimizer, loader, clip=lambda model: torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                                                               MAX_NORM),
                  epoch_rng_states=None):
    """epoch_rng_states: torch's RNG state to start each epoch from (retraining's coupling)."""
    for epoch in range(EPOCHS):
        model.train()
        batches = iter(loader)
        if epoch_rng_states is not None:
            torch.set_rng_state(epoch_rng_states[epoch])
        for x, y in batches:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            clip(model)
            optimizer.step()
    return model


@pytest.mark.parametrize("method", ["retrain", "finetune", "topk"])
def test_declared_clipping_is_repeated_by_retraining_bit_for_bit(method):
    engine, model, optimizer, loader = wrap(method)
    clipping_loop(model, optimizer, loader)
    assert same_state(ue.retrain(engine.initial, engine.data, engine.recipe, []), model)
    assert engine.recipe.fingerprint()["clip_grad_norm"] == MAX_NORM
    report = engine.unlearner().unlearn(FORGET)
    assert report.weights_changed


def test_retraining_without_the_ids_is_the_clipping_loop_without_them():
    """Against a loop this file writes over the schedule without F, not the library's."""
    engine, model, optimizer, loader = wrap("retrain")
    clipping_loop(model, optimizer, loader)
    mine = copy.deepcopy(engine.initial)
    batches = engine.data.sampler(BatchSchedule(engine.data.ids, BATCH, 0), torch.tensor(FORGET))
    clipping_loop(mine, torch.optim.AdamW(mine.parameters(), lr=1e-2),
                  torch.utils.data.DataLoader(engine.data.items, batch_sampler=batches),
                  epoch_rng_states=engine.recipe.epoch_rng_states)
    assert same_state(ue.retrain(engine.initial, engine.data, engine.recipe, FORGET), mine)


def clipped_by_hand(change=lambda clipped: clipped):
    """clip_grad_norm_'s own arithmetic, each gradient written once in place with `change` applied to the
    clipped gradients, so the version counters move exactly as under clip_grad_norm_: only the values
    can tell the change."""
    def clip(model):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        coefficient = torch.clamp(MAX_NORM / (torch.nn.utils.get_total_norm(grads) + 1e-6), max=1.0)
        for g, written in zip(grads, change([g * coefficient for g in grads])):
            g.copy_(written)
    return clip


def noise(g):  # gradient noise (e.g. a DP-style loop), 1e-5 of the gradient's mean magnitude
    return 1e-5 * g.abs().mean() * torch.randn_like(g)


def the_smallest_zeroed(clipped):
    """The non-zero gradient of least magnitude set to zero (barely moving the total norm)."""
    smallest = min((i for i, c in enumerate(clipped) if c.any()), key=lambda i: clipped[i].abs().sum())
    return [torch.zeros_like(c) if i == smallest else c for i, c in enumerate(clipped)]


def clip_then_add_noise(model):
    torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    for p in model.parameters():
        p.grad.add_(noise(p.grad))


LEAVING = {
    "another max_norm": (MAX_NORM, lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), MAX_NORM / 2)),
    "clipped, then noise added": (MAX_NORM, clip_then_add_noise),
    "noise added in the clip's own write": (MAX_NORM, clipped_by_hand(lambda clipped: [c + noise(c) for c in clipped])),
    "the smallest gradient zeroed in the clip's own write": (MAX_NORM, clipped_by_hand(the_smallest_zeroed)),
    "declared, not clipped": (MAX_NORM, lambda m: None),
    "a subset clipped": (MAX_NORM, lambda m: torch.nn.utils.clip_grad_norm_(m[5].parameters(), MAX_NORM)),
    "clipped, not declared": (None, lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), MAX_NORM)),
}


@pytest.mark.parametrize("case", list(LEAVING))
def test_a_loop_clipping_otherwise_than_declared_is_refused_at_the_first_step(case):
    declared, clip = LEAVING[case]
    engine, model, optimizer, loader = wrap("retrain", declared)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="optimizer step 0: .*clip_grad_norm"):
        clipping_loop(model, optimizer, loader, clip)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # before its update


def test_the_clip_written_by_hand_exactly_as_clip_grad_norm_is_accepted():
    """The control for the cases above that write the gradients by hand: unchanged, the loop passes."""
    engine, model, optimizer, loader = wrap("retrain")
    clipping_loop(model, optimizer, loader, clipped_by_hand())
    assert same_state(ue.retrain(engine.initial, engine.data, engine.recipe, []), model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_declared_clipping_of_a_low_precision_model_is_accepted_and_repeated(dtype):
    """clip_grad_norm_ computes the norm and scales in the gradients' own dtype: its rounding there is
    part of the recipe retraining repeats, not a change to refuse. A small max_norm so every step clips."""
    torch.manual_seed(0)
    x, y = torch.randn(N, 20).to(dtype), torch.randint(0, 3, (N,))
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 3)).to(dtype)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH, shuffle=True)
    engine = ue.UnlearningEngine()
    model, optimizer, loader = engine.make_unlearnable(model, torch.optim.SGD(model.parameters(), lr=0.1), loader,
                                                       method="retrain", epochs=EPOCHS, clip_grad_norm=0.05)
    for epoch in range(EPOCHS):
        for xb, yb in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            assert norm > 0.05  # it clipped
            optimizer.step()
    assert same_state(ue.retrain(engine.initial, engine.data, engine.recipe, []), model)


@pytest.mark.parametrize("method", ["mini", "deltagrad", "pcmu"])
def test_methods_working_from_unclipped_gradients_refuse_the_declaration_when_wrapping(method):
    model = cnn("group")
    loader = torch.utils.data.DataLoader(LazyImages(N), batch_size=BATCH, shuffle=True)
    options = {"clip_norm": 1.0, "tau": 0.006, "sigma": 0.01} if method == "pcmu" else {}
    engine = ue.UnlearningEngine()
    with pytest.raises(ue.UnsupportedModelError, match="unclipped mean gradient.*retrain, finetune, topk"):
        engine.make_unlearnable(model, torch.optim.SGD(model.parameters(), lr=0.05), loader, method=method,
                                epochs=EPOCHS, clip_grad_norm=MAX_NORM, **options)
    assert engine.run is None
