"""The retained-accuracy guard of Top-K / Random-k (unlearn_ext/perturb/guard.py): a guarded answer
is exactly the unguarded answer at the K it settled on, K is halved only while the guard fails,
its cost counts every answer and probe, and bad options are refused before any work."""
from __future__ import annotations

import copy

import pytest
import torch

from unlearn_ext.data import SGDConfig, TrainingData, train_sgd
from unlearn_ext.parameters import trainable
from unlearn_ext.perturb import AdaptiveTopKUnlearner, RandomKUnlearner, TopKUnlearner
from unlearn_ext.perturb.guard import guard_slice, slice_accuracy

from conftest import requires_compiled

pytestmark = requires_compiled


@pytest.fixture(scope="module")
def small():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(160, 6, generator=gen)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    data = TrainingData(x, y)
    torch.manual_seed(1)
    initial = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    config = SGDConfig(epochs=8, batch_size=16, lr=0.2, seed=0)
    original = train_sgd(copy.deepcopy(initial), data, config)
    return data, initial, config, original


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in trainable(model).values()])


FORGET = torch.arange(0, 160, 9)
# Reset to 0 with no repair: a large K costs retained accuracy, so a zero tolerance must halve it.
HARSH = dict(perturbation="reset", repair_epochs=0)


@pytest.mark.parametrize("cls", [TopKUnlearner, RandomKUnlearner])
def test_guarded_answer_is_the_unguarded_answer_at_the_chosen_k(small, cls):
    data, _, config, original = small
    guarded = cls(copy.deepcopy(original), data, config, k=0.8, guard=0.0, guard_halvings=4, guard_budget=None,
                  seed=3, **HARSH)
    report = guarded.unlearn(FORGET)
    chosen, trials = report.details["k_chosen"], report.details["guard_trials"]
    assert chosen < 0.8 and [t[0] for t in trials] == [0.8 / 2 ** i for i in range(len(trials))], trials
    plain = cls(copy.deepcopy(original), data, config, k=chosen, seed=3, **HARSH)
    plain.unlearn(FORGET)
    assert torch.equal(_flat(guarded.model), _flat(plain.model))
    # Every trial but the last failed the guard; the last one's accuracy is the kept model's.
    before = report.details["guard_accuracy_before"]
    assert all(before - acc > 0.0 for _, _, acc in trials[:-1])
    probe = guard_slice(data.without(FORGET), 256, 3, 1)
    assert before == slice_accuracy(original, data, probe)
    assert trials[-1][2] == slice_accuracy(guarded.model, data, probe)
    assert report.details["guard_met"] == (before - trials[-1][2] <= 0.0)


def test_guard_that_holds_at_once_changes_nothing_but_the_cost(small):
    data, _, config, original = small
    guarded = TopKUnlearner(copy.deepcopy(original), data, config, k=0.05, guard=1.0 - 1e-9, repair_epochs=1)
    report = guarded.unlearn(FORGET)
    plain = TopKUnlearner(copy.deepcopy(original), data, config, k=0.05, repair_epochs=1)
    plain_report = plain.unlearn(FORGET)
    assert torch.equal(_flat(guarded.model), _flat(plain.model))
    assert report.details["k_chosen"] == 0.05 and report.details["guard_met"] is True
    probe = min(256, len(data) - FORGET.numel())
    assert report.sample_gradients == plain_report.sample_gradients + 2 * probe


def test_guard_cost_counts_every_answer(small):
    data, _, config, original = small
    report = TopKUnlearner(copy.deepcopy(original), data, config, k=0.8, guard=0.0, guard_halvings=2,
                           guard_budget=None, **HARSH).unlearn(FORGET)
    single = TopKUnlearner(copy.deepcopy(original), data, config, k=0.8, **HARSH).unlearn(FORGET)
    probe = min(256, len(data) - FORGET.numel())
    tries = len(report.details["guard_trials"])
    # no repair: each answer costs its scoring pass (|F| sample gradients), the same at every K
    assert report.sample_gradients == tries * single.sample_gradients + (1 + tries) * probe


@pytest.mark.parametrize("options, named", [
    (dict(guard=-0.1), "guard"), (dict(guard=1.0), "guard"), (dict(guard=float("nan")), "guard"),
    (dict(guard=0.02, guard_size=0), "guard_size"), (dict(guard=0.02, guard_halvings=-1), "guard_halvings"),
    (dict(guard=0.02, guard_rounds=-1), "guard_rounds"), (dict(guard=0.02, guard_rounds=1.5), "guard_rounds"),
    (dict(guard=0.02, guard_budget=0.0), "guard_budget"), (dict(guard=0.02, guard_budget=float("inf")), "guard_budget"),
    (dict(guard=0.02, guard_data=torch.zeros(3, 6)), "guard_data"),
    (dict(guard=0.02, guard_data=(torch.zeros(3, 6), torch.zeros(2, dtype=torch.long))), "guard_data"),
    (dict(guard=0.02, guard_data=(torch.zeros(0, 6), torch.zeros(0, dtype=torch.long))), "guard_data"),
])
def test_bad_guard_options_are_refused(small, options, named):
    data, _, config, original = small
    with pytest.raises(ValueError, match=named):
        TopKUnlearner(copy.deepcopy(original), data, config, **options)


def test_adaptive_k_refuses_the_guard(small):
    data, _, config, original = small
    with pytest.raises(ValueError, match="own stop rule"):
        AdaptiveTopKUnlearner(copy.deepcopy(original), data, config, guard=0.02, holdout=data.batch(FORGET))


def test_registry_network_profile_resets_to_initial_weights_with_the_guard():
    """cnn / resnet / transformer rows use the 'network' profile: reset to the run's initial weights,
    the guard on; tabular models keep theirs (no guard, reset to 0)."""
    pytest.importorskip("sklearn")
    from unlearn_ext.evaluate import datasets, harness, methods
    ds = datasets.load("digits", form="grid", limit=120)
    run = harness.train_run(ds, "cnn", 0, epochs=1)
    topk = methods.TOPK.build(run, None)
    assert topk.guard == methods.NETWORK_GUARD and topk.k == methods.NETWORK_K
    assert all(torch.equal(a, b) for a, b in zip(topk.initial, trainable(run.initial).values()))
    assert methods.ADAPTIVE_METHODS[0].build(run, None).guard is None
    table = harness.train_run(datasets.load("digits", limit=120), "mlp", 0, epochs=1)
    plain = methods.TOPK.build(table, None)
    assert plain.guard is None and plain.initial is None


def test_a_failure_between_guarded_answers_leaves_the_model_as_before(small, monkeypatch):
    """A fault after the first answer (in the guard's probe) puts the pre-request weights back, and
    the retry then equals an uninterrupted guarded request."""
    from unlearn_ext.perturb import guard as guard_module
    data, _, config, original = small
    u = TopKUnlearner(copy.deepcopy(original), data, config, k=0.8, guard=0.0, guard_halvings=2, guard_budget=None,
                      **HARSH)
    calls = {"n": 0}
    real = guard_module.slice_accuracy

    def failing(*args):
        calls["n"] += 1
        if calls["n"] == 2:  # the probe after the first answer
            raise RuntimeError("injected")
        return real(*args)

    monkeypatch.setattr(guard_module, "slice_accuracy", failing)
    with pytest.raises(RuntimeError, match="injected"):
        u.unlearn(FORGET)
    assert torch.equal(_flat(u.model), _flat(original)) and u.requests == 0 and u.forgotten.numel() == 0
    monkeypatch.setattr(guard_module, "slice_accuracy", real)
    u.unlearn(FORGET)
    clean = TopKUnlearner(copy.deepcopy(original), data, config, k=0.8, guard=0.0, guard_halvings=2, guard_budget=None,
                          **HARSH)
    clean.unlearn(FORGET)
    assert torch.equal(_flat(u.model), _flat(clean.model))
