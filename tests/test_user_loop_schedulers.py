"""Schedulers the history methods and PCMU cannot follow, refused when wrapping: cycled momentum
(OneCycleLR and CyclicLR cycle it by default) and learning rates that differ between param groups
at some step (a list of lambdas, a list of max_lr). Mini-Unlearning and DeltaGrad replay one
learning rate and a constant momentum, PCMU takes one step size; before this check a cycled momentum
was replayed as a constant (a silently wrong answer) and diverging group rates were refused only
after training. Retraining, fine-tuning and Top-K repeat any schedule and keep working."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import unlearn_ext as ue
from user_models import LazyImages, cnn, same_state, user_loop

N, BATCH, EPOCHS = 48, 16, 2
STEPS = EPOCHS * N // BATCH
FORGET = [3, 17]
PCMU = dict(clip_norm=1.0, tau=0.006, sigma=0.01, max_request=3)


def sgd(model, momentum):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum)


def two_groups(model, momentum):
    first, *rest = model.parameters()
    return torch.optim.SGD([{"params": [first]}, {"params": rest}], lr=0.05, momentum=momentum)


# name: (optimizer over the model given a momentum, scheduler over the optimizer, words the refusal names)
UNFOLLOWABLE = {
    "one-cycle momentum": (sgd, lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=STEPS),
                           "OneCycleLR changes it.*cycle_momentum=False"),
    "cyclic momentum": (sgd, lambda o: torch.optim.lr_scheduler.CyclicLR(o, 0.01, 0.1, step_size_up=2),
                        "CyclicLR changes it.*cycle_momentum=False"),
    "a lambda per group": (two_groups, lambda o: torch.optim.lr_scheduler.LambdaLR(
        o, [lambda s: 1.0, lambda s: 0.5 ** s]), "LambdaLR gives the optimizer's param groups the rates"),
    "a max_lr per group": (two_groups, lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=[0.1, 0.05], total_steps=STEPS, cycle_momentum=False), "OneCycleLR gives .* param groups"),
}


def wrap(method, make_optimizer, make_scheduler, momentum):
    torch.manual_seed(0)
    model = cnn("group")
    optimizer = make_optimizer(model, momentum)
    scheduler = make_scheduler(optimizer)
    loader = torch.utils.data.DataLoader(LazyImages(N), batch_size=BATCH, shuffle=True)
    engine = ue.UnlearningEngine()
    wrapped = engine.make_unlearnable(model, optimizer, loader, method=method, epochs=EPOCHS,
                                      loss_fn=nn.CrossEntropyLoss(), scheduler=scheduler, scheduler_step="step",
                                      **(PCMU if method == "pcmu" else {}))
    return engine, scheduler, wrapped


@pytest.mark.parametrize("case", list(UNFOLLOWABLE))
@pytest.mark.parametrize("method", ["mini", "deltagrad", "pcmu"])
def test_a_schedule_the_method_cannot_follow_is_refused_when_wrapping_naming_scheduler_and_fix(method, case):
    make_optimizer, make_scheduler, words = UNFOLLOWABLE[case]
    momentum = 0.0 if method == "pcmu" else 0.9  # PCMU takes plain SGD: OneCycleLR sets a momentum anyway
    with pytest.raises(ue.UnsupportedModelError, match=words + ".*retrain, finetune, topk"):
        wrap(method, make_optimizer, make_scheduler, momentum)


@pytest.mark.parametrize("case", list(UNFOLLOWABLE))
@pytest.mark.parametrize("method", ["retrain", "finetune", "topk"])
def test_retraining_finetuning_and_topk_follow_any_schedule(method, case):
    make_optimizer, make_scheduler, _ = UNFOLLOWABLE[case]
    engine, scheduler, (model, optimizer, loader) = wrap(method, make_optimizer, make_scheduler, 0.9)
    user_loop(model, optimizer, loader, nn.CrossEntropyLoss(), EPOCHS, scheduler, per_step=True)
    assert same_state(ue.retrain(engine.initial, engine.data, engine.recipe, []), model)
    report = engine.unlearner().unlearn(FORGET)
    assert report.weights_changed


@pytest.mark.parametrize("method", ["mini", "deltagrad"])
def test_one_cycle_without_cycled_momentum_is_followed_by_the_history_methods(method):
    """cycle_momentum=False: one lr for every parameter at each step, a constant momentum."""
    one_cycle = lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=STEPS,  # noqa: E731
                                                              cycle_momentum=False)
    engine, scheduler, (model, optimizer, loader) = wrap(method, sgd, one_cycle, 0.9)
    user_loop(model, optimizer, loader, nn.CrossEntropyLoss(), EPOCHS, scheduler, per_step=True)
    report = engine.unlearner().unlearn(FORGET)
    assert report.status == "unlearned", report.reason
