"""The user's data, model and loop: a map-style Dataset, their DataLoader, their optimizer and
schedule, their loss with mean reduction, their loop -- wrapped by UnlearningEngine.

What is checked against what:
  * the library's retrain (no ids forgotten) against the user's own loop: bit for bit;
  * RetrainUnlearner against the user's own loop over the schedule without F (an independent
    loop the test writes, not the library's): bit for bit, buffers included;
  * every other method against the library's retrain of the same recipe.
"""
from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

import unlearn_ext as ue
from unlearn_ext.data import BatchSchedule, retrain
from user_models import (Augmented, LazyImages, LazyTokens, TinyTransformer, cnn, distance_ratio, same_state,
                         user_loop)

N, BATCH, EPOCHS = 96, 16, 3
FORGET = list(range(0, N, 20))  # 5 of 96 ids: ~5%


def recipes():
    """(name, optimizer factory, scheduler factory, scheduler per step?)"""
    return {
        "sgd": (lambda p: torch.optim.SGD(p, lr=0.05, weight_decay=1e-3), None, False),
        "momentum+step": (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
                          lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=4, gamma=0.7), True),
        "adam+cosine": (lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-4),
                        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=EPOCHS), False),
    }


def wrap_and_train(method, make_model, recipe="sgd", dataset=None, loss_fn=None, workers=0, collate=None,
                   augmentation_seed=None, **options):
    torch.manual_seed(0)
    model = make_model()
    make_opt, make_sched, per_step = recipes()[recipe]
    optimizer = make_opt(model.parameters())
    scheduler = None if make_sched is None else make_sched(optimizer)
    loss_fn = nn.CrossEntropyLoss() if loss_fn is None else loss_fn
    dataset = LazyImages(N) if dataset is None else dataset
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers,
                                         **({"collate_fn": collate} if collate else {}))
    engine = ue.UnlearningEngine()
    model, optimizer, loader = engine.make_unlearnable(
        model, optimizer, loader, method=method, epochs=EPOCHS, loss_fn=loss_fn, scheduler=scheduler,
        scheduler_step="step" if per_step else "epoch", augmentation_seed=augmentation_seed, **options)
    user_loop(model, optimizer, loader, loss_fn, EPOCHS, scheduler, per_step)
    return engine, model


# ---- the recipe: retraining repeats the user's loop --------------------------------------------------

@pytest.mark.parametrize("recipe", list(recipes()))
@pytest.mark.parametrize("norm, dropout", [("group", 0.2), ("batch", 0.0)])
def test_library_retrain_reproduces_the_users_loop_bit_for_bit(recipe, norm, dropout):
    engine, model = wrap_and_train("retrain", lambda: cnn(norm, dropout), recipe)
    again = retrain(engine.run.initial, engine.data, engine.recipe, [])
    assert same_state(again, model)


def test_workers_collate_and_seeded_augmentation_are_reproduced():
    """Two worker processes, the user's collate_fn and random augmentation from the global RNG:
    seeded per (seed, epoch, id), retraining sees the same augmented items."""
    def collate(items):
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])
    engine, model = wrap_and_train("retrain", lambda: cnn("group", 0.1), "adam+cosine", dataset=Augmented(LazyImages(N)),
                                   workers=2, collate=collate, augmentation_seed=5)
    assert engine.recipe.loader_options["num_workers"] == 2
    assert same_state(retrain(engine.run.initial, engine.data, engine.recipe, []), model)


class Logged(torch.utils.data.Dataset):
    """Records every item it hands out, with the epoch the loader asked for."""

    def __init__(self, base):
        self.base, self.log = base, {}

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        x, y = self.base[index]
        self.log[(getattr(index, "epoch", None), int(index))] = x
        return x, y


@pytest.mark.parametrize("seeded", [True, False])
def test_retraining_sees_the_same_augmentation_of_every_retained_item_only_when_seeded(seeded):
    """Without F, every retained item must get the augmentation it got in training. Seeded per
    (seed, epoch, id) it does; an unseeded transform (global RNG) shifts once F's draws are gone
    -- the documented loss of exactness."""
    base = Augmented(LazyImages(N))
    items = ue.SeededDataset(base, seed=3) if seeded else base
    logged = Logged(items)
    engine, _ = wrap_and_train("retrain", lambda: cnn("group"), "sgd", dataset=logged)
    trained = {k: v for k, v in logged.log.items() if k[0] is not None}  # not the loss probe's items
    logged.log = {}
    retrain(engine.run.initial, engine.data, engine.recipe, FORGET)
    retained = {k: v for k, v in trained.items() if k[1] not in FORGET}
    assert retained.keys() == logged.log.keys()
    same = all(torch.equal(retained[k], logged.log[k]) for k in retained)
    assert same == seeded


@pytest.mark.parametrize("recipe", ["sgd", "adam+cosine"])
def test_retrain_unlearner_equals_the_users_loop_without_the_ids(recipe):
    """The gold standard against a loop the test writes: the user's loop over the schedule's
    batches with F removed, from the same initial weights and RNG state. BatchNorm's running
    statistics included (buffers are part of the model)."""
    engine, model = wrap_and_train("retrain", lambda: cnn("batch"), recipe)
    report = engine.unlearner().unlearn(FORGET)
    assert report.status == "retrained"

    torch.manual_seed(0)
    mine = cnn("batch")
    make_opt, make_sched, per_step = recipes()[recipe]
    optimizer = make_opt(mine.parameters())
    scheduler = None if make_sched is None else make_sched(optimizer)
    torch.set_rng_state(engine.recipe.rng_state)
    schedule = BatchSchedule(engine.data.ids, BATCH, 0)
    loader = torch.utils.data.DataLoader(engine.data.items,
                                         batch_sampler=engine.data.sampler(schedule, torch.tensor(FORGET)))
    user_loop(mine, optimizer, loader, nn.CrossEntropyLoss(), EPOCHS, scheduler, per_step)
    assert same_state(model, mine)


def test_the_recipe_is_refused_after_the_optimizer_has_stepped():
    model = cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    nn.CrossEntropyLoss()(model(torch.randn(2, 1, 8, 8)), torch.tensor([0, 1])).backward()
    optimizer.step()
    with pytest.raises(ValueError, match="already taken steps"):
        ue.UnlearningEngine().make_unlearnable(model, optimizer, LazyImages(N), method="retrain", epochs=1,
                                               batch_size=8)


def test_plateau_schedules_and_streams_are_refused_with_a_sentence():
    model = cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    with pytest.raises(ValueError, match="validation metric"):
        ue.UnlearningEngine().make_unlearnable(model, optimizer, LazyImages(N), method="retrain", epochs=1,
                                               batch_size=8, scheduler=plateau)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield torch.zeros(1, 8, 8), 0
    with pytest.raises(TypeError, match="map-style"):
        ue.UnlearningEngine().make_unlearnable(model, optimizer, torch.utils.data.DataLoader(Stream(), batch_size=2),
                                               method="retrain", epochs=1)
    with pytest.raises(TypeError, match="pair"):
        ue.TrainingData(TensorsAsDicts()).batch(torch.tensor([0]))


class TensorsAsDicts(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return {"x": torch.zeros(2), "y": 0}


# ---- every method from the user's loop, against the library's retrain of the same recipe ------------

@pytest.mark.parametrize("method, recipe", [("mini", "sgd"), ("deltagrad", "sgd"), ("topk", "adam+cosine"),
                                            ("randomk", "adam+cosine"), ("finetune", "adam+cosine"),
                                            ("retrain", "adam+cosine"), ("topk", "momentum+step")])
def test_each_method_forgets_5_percent_from_the_users_loop(method, recipe):
    engine, model = wrap_and_train(method, lambda: cnn("group"), recipe)
    original = copy.deepcopy(model)
    report = engine.unlearner().unlearn(FORGET)
    retrained = retrain(engine.run.initial, engine.data, engine.recipe, FORGET)
    assert report.ids == FORGET and report.weights_changed
    ratio = distance_ratio(model, original, retrained)
    if method == "retrain":
        assert same_state(model, retrained)
    elif method in ("mini", "deltagrad"):
        assert report.status == "unlearned", report.reason
        assert ratio < 1.0, f"{method}: d/d0 = {ratio}"  # closer to retraining than doing nothing
    else:  # approximate methods with the user's optimizer in the repair / fine-tuning
        assert report.status == "unlearned"
        assert torch.isfinite(torch.cat([p.reshape(-1) for p in model.parameters()])).all()
        x, y = engine.data.batch(engine.data.without(FORGET))
        with torch.no_grad():
            mine = (model(x).argmax(1) == y).float().mean()
            gold = (retrained(x).argmax(1) == y).float().mean()
        assert abs(float(mine - gold)) < 0.3, (method, float(mine), float(gold))


def test_repairs_use_the_users_optimizer():
    """Fine-tuning with an Adam recipe runs Adam: equal to Adam steps over the schedule that the
    test writes itself (lr scaled, no scheduler), not to plain SGD."""
    engine, model = wrap_and_train("finetune", lambda: cnn("group"), "adam+cosine")
    before = copy.deepcopy(model)
    engine.unlearner().unlearn(FORGET)
    mine = copy.deepcopy(before)
    optimizer = torch.optim.Adam(mine.parameters(), lr=0.4 * 1e-2, weight_decay=1e-4)
    schedule = BatchSchedule(engine.data.ids, BATCH, 0 + 7919 * (1 + len(FORGET)))
    loader = torch.utils.data.DataLoader(engine.data.items,
                                         batch_sampler=engine.data.sampler(schedule, torch.tensor(FORGET)))
    state = torch.get_rng_state()
    user_loop(mine, optimizer, loader, nn.CrossEntropyLoss(), 1)
    torch.set_rng_state(state)
    assert same_state(model, mine)


# ---- the loss: mean reduction converted, anything else refused -----------------------------------------

@pytest.mark.parametrize("method", ["mini", "deltagrad"])
def test_mean_reduced_loss_gives_the_same_answer_as_a_per_sample_loss(method):
    """nn.CrossEntropyLoss() (mean) and a per-sample function with the mean taken in the loop give
    the same unlearned weights; both closer to retraining than doing nothing."""
    answers = []
    for loss_fn in (nn.CrossEntropyLoss(), lambda out, y, reduction="mean": nn.functional.cross_entropy(
            out, y, reduction=reduction)):
        engine, model = wrap_and_train(method, lambda: cnn("group"), "sgd", loss_fn=loss_fn)
        original = copy.deepcopy(model)
        engine.unlearner().unlearn(FORGET)
        retrained = retrain(engine.run.initial, engine.data, engine.recipe, FORGET)
        assert distance_ratio(model, original, retrained) < 1.0
        answers.append(model)
    assert same_state(*answers)


@pytest.mark.parametrize("method", ["mini", "deltagrad"])
def test_a_history_path_records_on_disk_and_answers_as_the_in_memory_store(method, tmp_path):
    """history="path": the engine makes a disk store there with the default codecs, so the answer is
    the in-memory default's, bit for bit; the file holds the recorded steps."""
    answers = []
    for history in (None, tmp_path / "history"):
        engine, model = wrap_and_train(method, lambda: cnn("group"), "sgd", history=history)
        engine.unlearner().unlearn(FORGET)
        answers.append(model)
    stored = ue.HistoryStore.open(str(tmp_path / "history"), writable=False)
    assert stored.steps == engine.run.recorder.store.steps and len(stored.steps) > 1
    stored.close()
    assert same_state(*answers)


def test_a_history_that_is_neither_store_nor_path_is_refused_before_training():
    with pytest.raises(TypeError, match="history must be a HistoryStore, a path or None, got int"):
        wrap_and_train("mini", lambda: cnn("group"), "sgd", history=3)


@pytest.mark.parametrize("method", ["retrain", "finetune", "topk", "randomk", "mini", "deltagrad"])
def test_an_option_the_method_does_not_take_is_refused_when_wrapping(method):
    """Method options reach the unlearner, which unlearner() builds after training: a misspelt one
    must be refused before the training run, not after it (and retraining, which takes none, must
    not ignore it)."""
    model = cnn("group")
    with pytest.raises(TypeError, match=f"make_unlearnable\\(method='{method}'\\) takes no option 'repair_epoch'"):
        ue.UnlearningEngine().make_unlearnable(
            model, torch.optim.SGD(model.parameters(), lr=0.05),
            torch.utils.data.DataLoader(LazyImages(N), batch_size=BATCH), method=method, epochs=EPOCHS,
            repair_epoch=2)


@pytest.mark.parametrize("option,value", [("seed", -1), ("seed", 1.5), ("augmentation_seed", -1),
                                          ("augmentation_seed", True)])
def test_a_seed_that_is_not_a_non_negative_integer_is_refused_when_wrapping(option, value):
    """seed=-1 was taken, and the first pass over the loader failed with numpy's "expected
    non-negative integer", naming no seed; 1.5 was silently truncated."""
    model = cnn("group")
    with pytest.raises((TypeError, ValueError), match=f"{option} must be a non-negative integer, got {value}"):
        ue.UnlearningEngine().make_unlearnable(
            model, torch.optim.SGD(model.parameters(), lr=0.05),
            torch.utils.data.DataLoader(LazyImages(N), batch_size=BATCH, shuffle=True), method="retrain",
            epochs=EPOCHS, **{option: value})


@pytest.mark.parametrize("option,value", [("epochs", 2.5), ("epochs", True), ("batch_size", 0), ("batch_size", 8.0)])
def test_epochs_and_batch_size_that_are_not_positive_integers_are_refused(option, value):
    """epochs=2.5 was truncated to 2 and batch_size=0 fell back to the DataLoader's, silently."""
    model = cnn("group")
    with pytest.raises((TypeError, ValueError), match=f"{option} must be a positive integer, got {value}"):
        ue.UnlearningEngine().make_unlearnable(
            model, torch.optim.SGD(model.parameters(), lr=0.05),
            torch.utils.data.DataLoader(LazyImages(N), batch_size=BATCH), method="retrain",
            **{"epochs": EPOCHS, option: value})


@pytest.mark.parametrize("method", ["retrain", "mini"])
def test_a_non_finite_loss_on_the_first_items_is_refused_naming_it(method):
    """NaN inputs: the probe's loss is NaN. Retraining took it (training then ran on NaN) and the
    history methods said the loss was neither a mean nor a sum of per-sample losses."""
    x = torch.randn(N, 1, 8, 8)
    x[5, 0, 2, 2] = float("nan")
    data = torch.utils.data.TensorDataset(x, torch.arange(N) % 3)
    model = cnn("group")
    with pytest.raises(ue.UnsupportedModelError, match="the loss of the first 32 items is nan"):
        ue.UnlearningEngine().make_unlearnable(model, torch.optim.SGD(model.parameters(), lr=0.05),
                                               torch.utils.data.DataLoader(data, batch_size=BATCH),
                                               method=method, epochs=EPOCHS)


@pytest.mark.parametrize("method", ["retrain", "mini"])
@pytest.mark.parametrize("loss_fn", [nn.CrossEntropyLoss(), nn.CrossEntropyLoss(weight=torch.tensor([0.0, 1, 1]))],
                         ids=["ignore_index", "zero class weight"])
def test_first_items_whose_targets_all_go_uncounted_are_not_taken_for_a_non_finite_loss(method, loss_fn):
    """The first 32 items' targets are all ignore_index (or of a class weighing 0): their mean is 0 / 0,
    NaN, legitimately. It was refused as non-finite data; it is a mean over counted targets: the
    methods that take any batch loss take it, the history methods refuse it as not a plain mean."""
    y = torch.arange(N) % 3
    y[:32] = -100 if loss_fn.weight is None else 0
    data = torch.utils.data.TensorDataset(torch.randn(N, 1, 8, 8), y)
    model = cnn("group")
    wrap = lambda: ue.UnlearningEngine().make_unlearnable(  # noqa: E731
        model, torch.optim.SGD(model.parameters(), lr=0.05), torch.utils.data.DataLoader(data, batch_size=BATCH),
        method=method, epochs=EPOCHS, loss_fn=loss_fn)
    if method == "retrain":
        wrap()
    else:
        with pytest.raises(ue.UnsupportedModelError, match="is neither the mean nor the sum"):
            wrap()


@pytest.mark.parametrize("options, message", [
    ({"tau": 0.006, "sigma": 0.01}, r"make_unlearnable\(method='pcmu'\) needs the PCMU option\(s\) clip_norm= "),
    ({}, r"make_unlearnable\(method='pcmu'\) needs the PCMU option\(s\) clip_norm=, tau=, sigma= "),
    ({"clip_norm": 1.0, "tau": 0.006, "sigma": 0.01, "clip_nrm": 2.0},
     r"make_unlearnable\(method='pcmu'\) takes no option 'clip_nrm'; its options: .*clip_norm"),
    ({"clip_norm": 1.0, "tau": 0.006, "sigma": 0.01, "shuffle": False},
     r"shuffle= is not an option of make_unlearnable\(method='pcmu'\): "),
])
def test_a_missing_or_unknown_pcmu_option_is_named_as_an_option_of_make_unlearnable(options, message):
    """PCMU's options go to its trainer when wrapping: a missing or misspelt one is named as an
    option of the call the user made, not as an argument of PCMUTrainer's constructor."""
    model = cnn("group")
    with pytest.raises((TypeError, ValueError), match=message):
        ue.UnlearningEngine().make_unlearnable(
            model, torch.optim.SGD(model.parameters(), lr=0.05),
            torch.utils.data.DataLoader(LazyImages(N), batch_size=BATCH), method="pcmu", epochs=EPOCHS, **options)


@pytest.mark.parametrize("method, option, message", [
    ("finetune", {"lr_factor": 0}, r"finetune needs epochs >= 1 \(an int\) and lr_factor > 0"),
    ("finetune", {"unlearn_epochs": 0}, r"finetune needs epochs >= 1 \(an int\)"),
    ("finetune", {"unlearn_epochs": 1.5}, r"finetune needs epochs >= 1 \(an int\)"),
    ("topk", {"beta": 1.5}, r"beta \(dampen's factor, w \*= beta\) must be a number in \[0, 1\]"),
    ("topk", {"beta": float("nan")}, r"beta .* must be a number in \[0, 1\]"),
    ("randomk", {"sigma": -0.1}, r"sigma \(noise's standard deviation\) must be a finite number > 0"),
    ("topk", {"sigma": float("inf")}, r"sigma .* must be a finite number > 0"),
    ("topk", {"ascent_step": 0}, r"ascent_step .* must be a finite number > 0"),
    ("topk", {"ascent_step": "0.1"}, r"ascent_step .* must be a finite number > 0"),
    ("topk", {"ascent_max_steps": 0}, r"ascent_max_steps must be an int >= 1"),
    ("topk", {"unlearn_seed": -1}, "seed must be a non-negative integer"),
    ("randomk", {"unlearn_seed": 2.5}, "seed must be a non-negative integer"),
    ("mini", {"unlearn_seed": "0"}, "seed must be a non-negative integer"),
    ("topk", {"k": 2.0}, r"a fractional k must be in \[0, 1\]"),
    ("topk", {"k": -1}, r"k must be in \[0, "),
    ("topk", {"repair": "everything"}, "repair must be one of"),
    ("randomk", {"k": 10 ** 9}, r"k must be in \[0, "),
    ("randomk", {"guard": 1.5}, "guard"),
    ("mini", {"curvature_budget": 0}, "curvature_budget must be a positive number"),
    ("mini", {"stability_limit": "2"}, "stability_limit must be a number"),
    ("mini", {"loss_rise_limit": float("nan")}, "loss_rise_limit must be a number"),
    ("mini", {"curvature_samples": 0}, "curvature_samples must be a positive int or 'auto'"),
    ("mini", {"delta_rule": "start"}, "delta_rule must be one of"),
    ("deltagrad", {"burn_in": -3}, "burn_in must be an int >= 0"),
    ("deltagrad", {"burn_in": "x"}, "burn_in must be an int >= 0"),
    ("deltagrad", {"period": 2.5}, "period must be an int >= 1"),
    ("deltagrad", {"memory": 0}, "memory must be an int >= 1"),
    ("deltagrad", {"max_prediction_error": None}, "max_prediction_error must be a number"),
    ("deltagrad", {"stability_limit": True}, "stability_limit must be a number"),
    ("deltagrad", {"unstable": "ignore"}, "unstable must be 'refuse' or 'damp'"),
    ("pcmu", {"clip_norm": 1.0, "tau": 0.006, "sigma": 0.01, "max_request": -1}, "max_request must be >= 0"),
])
def test_an_option_value_the_method_refuses_is_refused_when_wrapping(method, option, message):
    """Option values reach the unlearner, built after training: one it refuses must be refused
    before the training run, with the unlearner's own message (PCMU's trainer is built when wrapping
    and checks its values there; retraining takes no option)."""
    model = cnn("group")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    engine = ue.UnlearningEngine()
    with pytest.raises((ValueError, TypeError), match=message):
        engine.make_unlearnable(model, optimizer, torch.utils.data.DataLoader(LazyImages(N), batch_size=BATCH),
                                method=method, epochs=EPOCHS, **option)
    assert engine.run is None and not optimizer.state  # nothing was wrapped, nothing trained


@pytest.mark.parametrize("method, option, attribute", [("finetune", {"unlearn_epochs": 2}, "epochs"),
                                                       ("topk", {"unlearn_seed": 7}, "seed"),
                                                       ("randomk", {"unlearn_seed": 7}, "seed"),
                                                       ("mini", {"unlearn_seed": 7}, "seed")])
def test_an_unlearner_option_named_like_a_training_argument_passes_with_the_unlearn_prefix(method, option, attribute):
    """Fine-tuning's epochs and the seed of Mini-Unlearning, Top-K and Random-k are named like
    make_unlearnable's own epochs= and seed= (the training run's), which took them: they could not
    be set. They pass as unlearn_epochs= / unlearn_seed= and reach the unlearner; the bare name
    stays the training run's."""
    engine, model, optimizer, loader = _wrapped(method, **option)
    for _ in range(EPOCHS):
        for x, y in loader:
            optimizer.zero_grad()
            nn.CrossEntropyLoss()(model(x), y).backward()
            optimizer.step()
    assert engine.recipe.epochs == EPOCHS and engine.recipe.seed == 0
    assert getattr(engine.unlearner(), attribute) == next(iter(option.values()))


@pytest.mark.parametrize("method, name", [("finetune", "unlearn_epochs"), ("mini", "unlearn_seed")])
def test_the_unlearn_prefix_is_listed_among_the_options(method, name):
    with pytest.raises(TypeError, match=f"takes no option 'epoch_count'; its options: .*{name}"):
        _wrapped(method, epoch_count=2)


def _wrapped(method, **options):
    torch.manual_seed(0)
    model = cnn("group")
    engine = ue.UnlearningEngine()
    return engine, *engine.make_unlearnable(model, torch.optim.SGD(model.parameters(), lr=0.05),
                                            torch.utils.data.DataLoader(LazyImages(N), batch_size=BATCH),
                                            method=method, epochs=EPOCHS, **options)


def test_mini_equilibrium_with_a_momentum_optimizer_is_refused_when_wrapping():
    """unstable='equilibrium' is derived for plain SGD: with a momentum optimizer the unlearner
    refuses it, so the wrap must too, before the training run (the optimizer is known there)."""
    model = cnn("group")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    engine = ue.UnlearningEngine()
    with pytest.raises(ValueError, match="unstable='equilibrium' is derived for plain SGD; the training run uses "
                                         "momentum 0.9"):
        engine.make_unlearnable(model, optimizer, torch.utils.data.DataLoader(LazyImages(N), batch_size=BATCH),
                                method="mini", epochs=EPOCHS, unstable="equilibrium")
    assert engine.run is None and not optimizer.state


@pytest.mark.parametrize("method", ["mini", "deltagrad"])
def test_history_methods_refuse_a_summed_loss(method):
    with pytest.raises(ue.UnsupportedModelError, match="reduction='mean'"):
        wrap_and_train(method, lambda: cnn("group"), "sgd", loss_fn=nn.CrossEntropyLoss(reduction="sum"))


@pytest.mark.parametrize("method", ["mini", "deltagrad"])
@pytest.mark.parametrize("weights", [[1.0, 2.0, 5.0], [1.0, 1.0, 1.0]])
def test_history_methods_refuse_a_loss_that_is_not_a_plain_mean(method, weights):
    """A class-weighted mean divides by the batch's total weight; refused even with weights of 1,
    where a probe alone could not tell it from a mean."""
    weighted = nn.CrossEntropyLoss(weight=torch.tensor(weights))
    with pytest.raises(ue.UnsupportedModelError, match="neither the mean nor the sum"):
        wrap_and_train(method, lambda: cnn("group"), "sgd", loss_fn=weighted)


def test_retraining_takes_any_batch_loss_as_the_user_wrote_it():
    """Retraining repeats the user's own loss (here a class-weighted mean) exactly."""
    weighted = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 5.0]))
    engine, model = wrap_and_train("retrain", lambda: cnn("group"), "adam+cosine", loss_fn=weighted)
    assert same_state(retrain(engine.run.initial, engine.data, engine.recipe, []), model)


# ---- one policy for layers: method x {BatchNorm, dropout + attention} ----------------------------------

@pytest.mark.parametrize("method", ["mini", "deltagrad"])
def test_batchnorm_in_training_mode_is_refused_when_wrapping_naming_layer_and_fix(method):
    with pytest.raises(ue.UnsupportedModelError) as info:
        wrap_and_train(method, lambda: cnn("batch"), "sgd")
    message = str(info.value)
    assert "BatchNorm" in message and "1" in message and "GroupNorm" in message and "eval mode" in message


@pytest.mark.parametrize("method", ["mini", "deltagrad"])
def test_history_methods_refuse_other_optimizers_when_wrapping(method):
    with pytest.raises(ue.UnsupportedModelError, match="Adam"):
        wrap_and_train(method, lambda: cnn("group"), "adam+cosine")


@pytest.mark.parametrize("method", ["topk", "randomk", "finetune", "retrain"])
def test_batchnorm_models_work_and_keep_buffers_consistent(method):
    """Methods that do not replay single samples accept BatchNorm; the buffers they leave are those
    their own training steps produced (a restart through the ledger restores them too)."""
    engine, model = wrap_and_train(method, lambda: cnn("batch"), "momentum+step")
    running = model[1].running_mean.clone()
    report = engine.unlearner().unlearn(FORGET)
    assert report.status in ("unlearned", "retrained")
    assert not torch.equal(model[1].running_mean, running)  # its own repair / retraining updated them
    state = engine.unlearner().state_dict()
    assert torch.equal(state["buffers"]["1.running_mean"], model[1].running_mean)


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


@pytest.mark.parametrize("method", ["mini", "deltagrad", "topk", "retrain"])
def test_transformer_with_dropout_and_attention(method):
    """Attention has no forward-mode derivative on CPU: Mini's Hessian-vector products fall back to
    reverse-over-reverse; replays run with dropout off."""
    engine, model = wrap_and_train(method, lambda: TinyTransformer(), "sgd" if method in ("mini", "deltagrad") else
                                   "adam+cosine", dataset=LazyTokens(N))
    original = copy.deepcopy(model)
    report = engine.unlearner().unlearn(FORGET)
    retrained = retrain(engine.run.initial, engine.data, engine.recipe, FORGET)
    assert report.status in ("unlearned", "retrained", "fallback"), report.reason
    if method == "retrain":
        assert same_state(model, retrained)
    elif method in ("mini", "deltagrad") and report.status == "unlearned":
        assert distance_ratio(model, original, retrained) < 1.0


class _Cube(torch.autograd.Function):
    """x^3 with a backward only: forward-mode AD (and torch.func) cannot go through it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x ** 3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x * x * g


class _CubeNet(nn.Module):
    def __init__(self, custom: bool):
        super().__init__()
        self.custom, self.linear = custom, nn.Linear(4, 3)

    def forward(self, x):
        h = self.linear(x)
        return _Cube.apply(h) if self.custom else h ** 3


def test_hessian_products_fall_back_to_reverse_over_reverse_where_forward_mode_is_missing():
    """The same Hessian-vector product from a layer forward mode cannot differentiate (custom
    Function, reverse-over-reverse) and from the plain layer (forward-over-reverse)."""
    from unlearn_ext.mini.curvature import HessianOperator
    from unlearn_ext.mini.vectors import FlatModel
    torch.manual_seed(0)
    data = ue.TrainingData(torch.randn(20, 4), torch.randint(0, 3, (20,)))
    products = []
    for custom in (False, True):
        torch.manual_seed(1)
        model = _CubeNet(custom)
        flat = FlatModel(model, data)
        op = HessianOperator(flat, flat.flat(), data.ids, weight_decay=0.01)
        v = torch.randn(flat.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        products.append(op(v))
        assert op._forward_mode is (not custom)
    torch.testing.assert_close(products[0], products[1], rtol=1e-5, atol=1e-6)


def test_progress_goes_to_logging_not_stdout(caplog, capsys):
    import logging
    with caplog.at_level(logging.INFO, logger="unlearn_ext"):
        engine, _ = wrap_and_train("retrain", lambda: cnn("group"), "adam+cosine")
        engine.unlearner().unlearn(FORGET)
    messages = [r.getMessage() for r in caplog.records if r.name == "unlearn_ext"]
    assert any("trained epoch 3 of 3" in m for m in messages)
    assert any("retrain: forgetting 5 id(s)" in m for m in messages)
    assert capsys.readouterr().out == ""


# ---- the whole matrix: every method x {BatchNorm CNN, dropout + attention transformer} ----------------

PCMU_OPTIONS = {"clip_norm": 1.0, "tau": 0.006, "sigma": 0.01}
LAYER_CASES = {"batchnorm-cnn": (lambda: cnn("batch"), lambda: LazyImages(N)),
               "dropout-attention": (lambda: TinyTransformer(dropout=0.2), lambda: LazyTokens(N))}
PER_SAMPLE_METHODS = ("mini", "deltagrad", "pcmu")


def _wrap_plain(method, make_model, dataset):
    """The user's loop with plain SGD (what every method accepts), PCMU's options where needed."""
    torch.manual_seed(0)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = nn.CrossEntropyLoss()
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True)
    engine = ue.UnlearningEngine()
    options = PCMU_OPTIONS if method == "pcmu" else {}
    model, optimizer, loader = engine.make_unlearnable(model, optimizer, loader, method=method, epochs=EPOCHS,
                                                       loss_fn=loss_fn, **options)
    user_loop(model, optimizer, loader, loss_fn, EPOCHS)
    return engine, model


@pytest.mark.parametrize("case", list(LAYER_CASES))
@pytest.mark.parametrize("method", ue.engine.METHODS)
def test_layer_matrix_every_method_works_or_refuses_naming_layer_and_fix(method, case):
    make_model, make_data = LAYER_CASES[case]
    if case == "batchnorm-cnn" and method in PER_SAMPLE_METHODS:
        with pytest.raises(ue.UnsupportedModelError) as info:
            _wrap_plain(method, make_model, make_data())
        assert "BatchNorm in training mode" in str(info.value) and "layers: 1" in str(info.value)
        assert "GroupNorm" in str(info.value) and "eval mode" in str(info.value)
        return
    engine, model = _wrap_plain(method, make_model, make_data())
    report = engine.unlearner().unlearn(FORGET)
    assert report.status in ("unlearned", "retrained", "fallback", "certified"), report.reason
    assert torch.isfinite(torch.cat([p.detach().reshape(-1) for p in model.parameters()])).all()
    if method == "retrain":
        assert same_state(model, retrain(engine.initial, engine.data, engine.recipe, FORGET))


@pytest.mark.parametrize("method", PER_SAMPLE_METHODS)
def test_frozen_batchnorm_is_accepted_and_its_buffers_are_left_alone(method):
    """BatchNorm in eval mode (frozen statistics) is what the refusal suggests: the methods that
    replay per-sample gradients accept it and never move its buffers."""
    torch.manual_seed(0)
    model = cnn("batch")
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.1, 0.1)
    model[1].eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = nn.CrossEntropyLoss()
    engine = ue.UnlearningEngine()
    model, optimizer, loader = engine.make_unlearnable(
        model, optimizer, torch.utils.data.DataLoader(LazyImages(N), batch_size=BATCH), method=method, epochs=EPOCHS,
        loss_fn=loss_fn, **(PCMU_OPTIONS if method == "pcmu" else {}))
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    for _ in range(EPOCHS):  # the user's loop, keeping BatchNorm frozen (no model.train())
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
    report = engine.unlearner().unlearn(FORGET)
    assert report.status in ("unlearned", "retrained", "fallback", "certified"), report.reason
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())


def _frozen_batchnorm_cnn():
    torch.manual_seed(0)
    model = cnn("batch", dropout=0.3)
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.1, 0.1)
    model.eval()  # frozen statistics, and the loop below never calls model.train(): dropout off too
    return model


@pytest.mark.parametrize("method", ["retrain", "finetune", "mini", "deltagrad"])
def test_a_loop_in_eval_mode_is_what_retraining_repeats(method):
    """Retraining trains each module in the training mode the loop's steps had (here eval mode:
    frozen BatchNorm, dropout off), not in training mode: without deletions it is the loop bit for
    bit, and it moves no BatchNorm statistic."""
    model = _frozen_batchnorm_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = nn.CrossEntropyLoss()
    engine = ue.UnlearningEngine()
    model, optimizer, loader = engine.make_unlearnable(
        model, optimizer, torch.utils.data.DataLoader(LazyImages(N), batch_size=BATCH, shuffle=True), method=method,
        epochs=EPOCHS, loss_fn=loss_fn)
    for _ in range(EPOCHS):
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
    engine.unlearner()
    assert same_state(retrain(engine.initial, engine.data, engine.recipe, []), engine.trained)
    retrained = retrain(engine.initial, engine.data, engine.recipe, FORGET)
    assert all(torch.equal(v, dict(engine.initial.named_buffers())[k]) for k, v in retrained.named_buffers())


def test_a_loop_that_changes_training_modes_is_refused_at_that_step():
    """Retraining trains every step in the modes of the loop's first step; a loop whose later step
    runs in other modes (model.eval() for a validation pass, no model.train() after it) is refused
    at that step, before its update, naming the modules."""
    torch.manual_seed(0)
    model = cnn("group", dropout=0.3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = nn.CrossEntropyLoss()
    model, optimizer, loader = ue.UnlearningEngine().make_unlearnable(
        model, optimizer, torch.utils.data.DataLoader(LazyImages(N), batch_size=BATCH, shuffle=True),
        method="retrain", epochs=EPOCHS, loss_fn=loss_fn)
    model.train()
    batches = iter(loader)
    for step in range(2):
        x, y = next(batches)
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        if step == 1:
            model.eval()
            before = [p.detach().clone() for p in model.parameters()]
            with pytest.raises(RuntimeError,
                               match=r"optimizer step 1: modules .*\b3\b.* another training mode than at step 0"):
                optimizer.step()
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
        else:
            optimizer.step()


@pytest.mark.parametrize("method", ["topk", "randomk"])
def test_a_one_id_request_on_a_batchnorm_model_and_scoring_leaves_buffers_alone(method, monkeypatch):
    """Scores are taken in eval mode: one id through a BatchNorm layer works, and the scoring pass
    itself moves no running statistic (only the repair, a documented training step, does)."""
    engine, model = wrap_and_train(method, lambda: cnn("batch"), "momentum+step")
    unlearner = engine.unlearner()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    seen = {}
    original_select = type(unlearner)._select

    def select_then_look(self, new):
        out = original_select(self, new)
        seen.update({k: torch.equal(v, buffers[k]) for k, v in model.named_buffers()})
        return out
    monkeypatch.setattr(type(unlearner), "_select", select_then_look)
    report = unlearner.unlearn([7])
    assert report.status == "unlearned" and report.ids == [7]
    assert seen and all(seen.values())


class FrozenStatisticsCNN(nn.Module):
    """A model whose own train() keeps its BatchNorm frozen (a common fine-tuning idiom), and counts
    its calls: retraining must train in the modes the loop's steps had, whatever train() does."""

    def __init__(self):
        super().__init__()
        self.net = cnn("batch", dropout=0.3)
        self.train_calls = 0

    def train(self, mode: bool = True):
        super().train(mode)
        self.net[1].eval()
        self.train_calls += 1
        return self

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("method", ["retrain", "finetune", "topk", "deltagrad"])
@pytest.mark.parametrize("calls_train", [True, False], ids=["loop calls train()", "loop never calls train()"])
def test_a_custom_train_override_is_repeated_by_retraining(method, calls_train):
    """The loop calls the override each epoch (BatchNorm frozen, dropout on), or never calls it (the
    model trains as constructed: BatchNorm on batch statistics; DeltaGrad, which needs it frozen,
    as model.train() left it before wrapping). Retraining takes the modules'
    modes recorded at the loop's first step; it does not call train() itself, which would change
    the modes of a loop that never did."""
    torch.manual_seed(0)
    model = FrozenStatisticsCNN()
    with torch.no_grad():
        model.net[1].running_mean.uniform_(-0.1, 0.1)
    if method == "deltagrad" or not calls_train:
        model.train()
    loss_fn = nn.CrossEntropyLoss()
    engine = ue.UnlearningEngine()
    model, optimizer, loader = engine.make_unlearnable(
        model, torch.optim.SGD(model.parameters(), lr=0.05),
        torch.utils.data.DataLoader(LazyImages(N), batch_size=BATCH, shuffle=True), method=method, epochs=EPOCHS,
        loss_fn=loss_fn)
    frozen = calls_train or method == "deltagrad"
    if not frozen:  # as constructed: every module in training mode, BatchNorm included
        nn.Module.train(model)
    for _ in range(EPOCHS):
        if calls_train:
            model.train()
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
    engine.unlearner()
    assert engine.recipe.train_modes["net.1"] is not frozen
    calls = engine.initial.train_calls
    assert same_state(retrain(engine.initial, engine.data, engine.recipe, []), engine.trained)
    assert engine.initial.train_calls == calls


@pytest.mark.parametrize("method", ["deltagrad", "pcmu"])
def test_a_model_whose_own_train_freezes_batchnorm_is_told_to_call_it_before_wrapping(method):
    """As constructed every module trains, BatchNorm included, so the methods needing it frozen refuse;
    the model's own train() would freeze it: the refusal says so (it suggested rebuilding the model)."""
    model = FrozenStatisticsCNN()
    with pytest.raises(ue.UnsupportedModelError, match=r"the model's own train\(\) puts them in eval mode: call "
                                                       r"model.train\(\) before wrapping"):
        ue.UnlearningEngine().make_unlearnable(model, torch.optim.SGD(model.parameters(), lr=0.05),
                                               torch.utils.data.DataLoader(LazyImages(N), batch_size=BATCH),
                                               method=method, epochs=EPOCHS, **(PCMU_OPTIONS if method == "pcmu" else {}))
    assert model.net[1].training  # train() was tried on a copy
    with pytest.raises(ue.UnsupportedModelError) as plain:  # a plain BatchNorm model: no such hint
        m = cnn("batch")
        ue.UnlearningEngine().make_unlearnable(m, torch.optim.SGD(m.parameters(), lr=0.05),
                                               torch.utils.data.DataLoader(LazyImages(N), batch_size=BATCH),
                                               method=method, epochs=EPOCHS, **(PCMU_OPTIONS if method == "pcmu" else {}))
    assert "own train()" not in str(plain.value)


class UncopyableFrozenStatisticsCNN(FrozenStatisticsCNN):
    """FrozenStatisticsCNN holding something copy.deepcopy refuses (a lock)."""

    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()


def test_the_batchnorm_refusal_stands_when_its_hint_cannot_be_tried():
    """The hint tries the model's train() on a copy; a model that cannot be copied got deepcopy's
    TypeError instead of the refusal."""
    model = UncopyableFrozenStatisticsCNN()
    with pytest.raises(ue.UnsupportedModelError, match="BatchNorm in training mode"):
        ue.UnlearningEngine().make_unlearnable(model, torch.optim.SGD(model.parameters(), lr=0.05),
                                               torch.utils.data.DataLoader(LazyImages(N), batch_size=BATCH),
                                               method="deltagrad", epochs=EPOCHS)
