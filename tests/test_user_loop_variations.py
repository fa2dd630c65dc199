"""The user's own loop with the variations real loops have: clipping, gradient accumulation, LR
schedules stepped per batch, several param groups, frozen parameters, zero_grad(set_to_none=False),
a step skipped on a non-finite loss, AdamW / RMSprop, more or fewer epochs than declared.

Each one either works -- the library's retraining without F equals a plain loop this file writes
over the same schedule without F, bit for bit -- or is refused, at the first optimizer step that
leaves the recipe (before its update) or when the unlearner is asked for, with a message naming
what the loop did.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import unlearn_ext as ue
from unlearn_ext.data import BatchSchedule
from user_models import LazyImages, same_state

N, BATCH, EPOCHS = 48, 8, 2
FORGET = [3, 17]
STEPS = EPOCHS * N // BATCH


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 3))


def warmup(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 4))


def one_cycle(optimizer):
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=STEPS)


def two_groups(model):
    return torch.optim.SGD([{"params": model[1].parameters(), "lr": 0.1, "weight_decay": 1e-3},
                            {"params": model[3].parameters(), "lr": 0.05}], lr=0.05, momentum=0.9)


def frozen_first_layer(model):
    model[1].weight.requires_grad_(False)
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)


# name: (optimizer factory over the model, scheduler factory, scheduler_step, zero_grad set_to_none)
WORKING = {
    "lambda-warmup-per-step": (lambda m: torch.optim.SGD(m.parameters(), lr=0.05), warmup, "step", True),
    "one-cycle-per-step": (lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), one_cycle, "step", True),
    "two-param-groups": (two_groups, None, "epoch", True),
    "frozen-parameter": (frozen_first_layer, None, "epoch", True),
    "parameter-not-given": (lambda m: torch.optim.SGD(m[3].parameters(), lr=0.05), None, "epoch", True),
    "zero-grad-keeps-tensors": (lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9,
                                                          weight_decay=1e-3), None, "epoch", False),
    "adamw": (lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2), None, "epoch", True),
    "rmsprop": (lambda m: torch.optim.RMSprop(m.parameters(), lr=1e-3), None, "epoch", True),
}


def plain_loop(model, optimizer, loader, loss_fn, epochs, scheduler=None, scheduler_step="epoch", set_to_none=True):
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad(set_to_none=set_to_none)
            loss_fn(model(x), y).backward()
            optimizer.step()
            if scheduler is not None and scheduler_step == "step":
                scheduler.step()
        if scheduler is not None and scheduler_step == "epoch":
            scheduler.step()


def wrap(method, make_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.05), make_scheduler=None,
         scheduler_step="epoch"):
    torch.manual_seed(0)
    model = mlp()
    optimizer = make_optimizer(model)
    scheduler = None if make_scheduler is None else make_scheduler(optimizer)
    loader = torch.utils.data.DataLoader(LazyImages(N), batch_size=BATCH, shuffle=True)
    engine = ue.UnlearningEngine()
    model, optimizer, loader = engine.make_unlearnable(model, optimizer, loader, method=method, epochs=EPOCHS,
                                                       loss_fn=nn.CrossEntropyLoss(), scheduler=scheduler,
                                                       scheduler_step=scheduler_step)
    return engine, model, optimizer, scheduler, loader


@pytest.mark.parametrize("variation", list(WORKING))
def test_retraining_repeats_the_users_variation_of_the_loop_bit_for_bit(variation):
    """The library's retraining without F against this file's own loop over the schedule without F,
    from the same initial weights and RNG state; and without F = [] against the user's trained model."""
    make_optimizer, make_scheduler, scheduler_step, set_to_none = WORKING[variation]
    engine, model, optimizer, scheduler, loader = wrap("retrain", make_optimizer, make_scheduler, scheduler_step)
    loss_fn = nn.CrossEntropyLoss()
    plain_loop(model, optimizer, loader, loss_fn, EPOCHS, scheduler, scheduler_step, set_to_none)
    engine.unlearner()  # the loop kept to the recipe: not refused
    assert same_state(ue.retrain(engine.initial, engine.data, engine.recipe, []), model)

    mine = copy.deepcopy(engine.initial)
    optimizer = make_optimizer(mine)
    scheduler = None if make_scheduler is None else make_scheduler(optimizer)
    torch.set_rng_state(engine.recipe.rng_state)
    batches = engine.data.sampler(BatchSchedule(engine.data.ids, BATCH, 0), torch.tensor(FORGET))
    plain_loop(mine, optimizer, torch.utils.data.DataLoader(engine.data.items, batch_sampler=batches), loss_fn,
               EPOCHS, scheduler, scheduler_step, set_to_none)
    assert same_state(ue.retrain(engine.initial, engine.data, engine.recipe, FORGET), mine)


# ---- loops that leave the recipe: refused at the step that leaves it, before its update ------------

def clipping_loop(model, optimizer, loader, scheduler):
    for _ in range(EPOCHS):
        for x, y in loader:
            optimizer.zero_grad()
            nn.CrossEntropyLoss()(model(x), y).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
            optimizer.step()


def accumulating_loop(model, optimizer, loader, scheduler):
    for _ in range(EPOCHS):
        for k, (x, y) in enumerate(loader):
            (nn.CrossEntropyLoss()(model(x), y) / 2).backward()
            if k % 2 == 1:
                optimizer.step()
                optimizer.zero_grad()


def skipping_loop(model, optimizer, loader, scheduler):
    for _ in range(EPOCHS):
        for k, (x, y) in enumerate(loader):
            optimizer.zero_grad()
            loss = nn.CrossEntropyLoss()(model(x), y)
            if k == 2:
                loss = loss * float("nan")
            loss.backward()
            if not torch.isfinite(loss):
                continue  # the next batch's backward adds to this one's gradient
            optimizer.step()


def gradient_dropping_loop(model, optimizer, loader, scheduler):
    for _ in range(EPOCHS):
        for x, y in loader:
            optimizer.zero_grad()
            nn.CrossEntropyLoss()(model(x), y).backward()
            model[3].bias.grad = None  # the step then leaves that parameter where it is
            optimizer.step()


def gradient_replacing_loop(replace):
    """A loop writing a new gradient tensor (not in place): its version counter is its own."""
    def loop(model, optimizer, loader, scheduler):
        for _ in range(EPOCHS):
            for x, y in loader:
                optimizer.zero_grad()
                nn.CrossEntropyLoss()(model(x), y).backward()
                for p in model.parameters():
                    p.grad = replace(p.grad)
                optimizer.step()
    return loop


def undeclared_scheduler_loop(model, optimizer, loader, scheduler):
    mine = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)  # not given to make_unlearnable
    for _ in range(EPOCHS):
        for x, y in loader:
            optimizer.zero_grad()
            nn.CrossEntropyLoss()(model(x), y).backward()
            optimizer.step()
        mine.step()


def per_batch_scheduler_declared_per_epoch_loop(model, optimizer, loader, scheduler):
    for _ in range(EPOCHS):
        for x, y in loader:
            optimizer.zero_grad()
            nn.CrossEntropyLoss()(model(x), y).backward()
            optimizer.step()
            scheduler.step()


def extra_epoch_loop(model, optimizer, loader, scheduler):
    for _ in range(EPOCHS + 1):
        for x, y in loader:
            optimizer.zero_grad()
            nn.CrossEntropyLoss()(model(x), y).backward()
            optimizer.step()


REFUSED_IN_THE_LOOP = {
    "clip_grad_norm_": (clipping_loop, None, "changed the gradient of 1.weight between backward and step"),
    "gradient-accumulation": (accumulating_loop, None, "gradient of 1.weight comes from 2 backward passes"),
    "skip-on-non-finite-loss": (skipping_loop, None, "2 backward passes.*skipped"),
    "a-gradient-dropped": (gradient_dropping_loop, None, "gradient of 3.bias was removed"),
    "gradients-replaced-by-a-scaled-copy": (gradient_replacing_loop(lambda g: g * 0.5), None,
                                            "replaced the gradient of 1.weight by another tensor"),
    "gradients-replaced-by-a-clamped-copy": (gradient_replacing_loop(lambda g: torch.clamp(g, -1e-3, 1e-3)), None,
                                             "replaced the gradient of 1.weight by another tensor"),
    "undeclared-scheduler": (undeclared_scheduler_loop, None, "learning rates are \\[0.025\\], the recipe's "
                                                              "schedule gives \\[0.05\\]"),
    "scheduler-stepped-per-batch": (per_batch_scheduler_declared_per_epoch_loop,
                                    lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
                                    "scheduler_step='step'"),
    "more-epochs": (extra_epoch_loop, None, "more optimizer steps than the recipe's 2 epochs x 6 batches = 12"),
}


@pytest.mark.parametrize("method", ["retrain", "topk", "mini", "deltagrad"])
@pytest.mark.parametrize("variation", list(REFUSED_IN_THE_LOOP))
def test_a_loop_leaving_the_recipe_is_refused_at_that_step_before_its_update(method, variation):
    loop, make_scheduler, message = REFUSED_IN_THE_LOOP[variation]
    engine, model, optimizer, scheduler, loader = wrap(method, make_scheduler=make_scheduler)
    after_each_step = [copy.deepcopy(model.state_dict())]
    optimizer.register_step_post_hook(lambda *_: after_each_step.append(copy.deepcopy(model.state_dict())))
    with pytest.raises(RuntimeError, match=message):
        loop(model, optimizer, loader, scheduler)
    assert same_state_dict(after_each_step[-1], model.state_dict())  # the refused step did not update


def same_state_dict(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["retrain", "topk", "finetune", "mini", "deltagrad"])
def test_a_loop_that_stops_early_is_refused_when_the_unlearner_is_asked_for(method):
    engine, model, optimizer, _, loader = wrap(method)
    for k, (x, y) in enumerate(loader):  # breaks out of the first epoch
        if k == 4:
            break
        optimizer.zero_grad()
        nn.CrossEntropyLoss()(model(x), y).backward()
        optimizer.step()
    with pytest.raises(RuntimeError, match="training took 4 optimizer steps; the recipe \\(2 epochs of 6 batches\\) "
                                           "has 12"):
        engine.unlearner()
