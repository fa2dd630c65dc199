"""The held-out accuracy guard of Top-K / Random-k (unlearn_ext/perturb/guard.py with guard_data):
where a setting makes Top-K wreck accuracy, the guard brings held-out accuracy back within its
tolerance and test accuracy back near retraining's; its repair rounds, K halvings and cost budget do
what the report says; its reference is the original model's accuracy, kept across requests and in
the saved state."""
from __future__ import annotations

import copy

import pytest
import torch

from unlearn_ext.data import SGDConfig, TrainingData, retrain, train_sgd
from unlearn_ext.metrics import accuracy
from unlearn_ext.perturb import RandomKUnlearner, TopKUnlearner
from unlearn_ext.perturb import guard as accuracy_guard

from conftest import requires_compiled

pytestmark = requires_compiled

CLASSES, DIM = 4, 10


def _draw(n: int, seed: int):
    """A Gaussian mixture: CLASSES well-separated means in DIM dimensions (the same means for every draw)."""
    means = torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(0)) * 1.5
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=gen)
    return means[y] + torch.randn(n, DIM, generator=gen), y


@pytest.fixture(scope="module")
def mixture():
    data = TrainingData(*_draw(400, 1))
    validation, test = _draw(200, 2), _draw(600, 3)
    torch.manual_seed(0)
    initial = torch.nn.Sequential(torch.nn.Linear(DIM, 32), torch.nn.Tanh(), torch.nn.Linear(32, CLASSES))
    config = SGDConfig(epochs=20, batch_size=32, lr=0.1, seed=0)
    original = train_sgd(copy.deepcopy(initial), data, config)
    forget = torch.arange(0, 400, 10)
    return data, validation, test, initial, config, original, forget


# Resetting 90% of the coordinates to the initial weights with one short repair epoch wrecks the model.
WRECK = dict(k=0.9, perturbation="reset", repair_epochs=1, repair_lr_factor=0.1)


def test_guard_restores_accuracy_that_top_k_wrecked(mixture):
    data, validation, test, initial, config, original, forget = mixture
    gold = accuracy(retrain(initial, data, config, forget), *test)
    plain = TopKUnlearner(copy.deepcopy(original), data, config, initial=initial, **WRECK)
    plain.unlearn(forget)
    wrecked = accuracy(plain.model, *test)
    assert wrecked < gold - 0.1, (wrecked, gold)  # the setting does wreck it
    guarded = TopKUnlearner(copy.deepcopy(original), data, config, initial=initial, guard=0.02, guard_rounds=2,
                            guard_halvings=4, guard_budget=None, guard_data=validation, **WRECK)
    report = guarded.unlearn(forget)
    d = report.details
    assert d["guard_met"] and d["guard_stop"] == "met" and d["guard_probe"] == "held-out"
    # what the report says is what the model does on the held-out data
    reference, after = accuracy(original, *validation), accuracy(guarded.model, *validation)
    assert d["guard_accuracy_before"] == reference and d["guard_trials"][-1][2] == after
    assert reference - after <= 0.02
    restored = accuracy(guarded.model, *test)
    assert restored >= gold - 0.03 and restored > wrecked + 0.1, (restored, gold, wrecked)
    assert len(d["guard_trials"]) > 1 and report.how.startswith("topk: K = ")


def test_repair_rounds_come_before_a_smaller_k(mixture):
    data, validation, _, initial, config, original, forget = mixture
    u = TopKUnlearner(copy.deepcopy(original), data, config, initial=initial, guard=0.0, guard_rounds=2,
                      guard_halvings=1, guard_budget=None, guard_data=validation, **WRECK)
    report = u.unlearn(forget)
    trials, reference = report.details["guard_trials"], report.details["guard_accuracy_before"]
    # each K: the answer, then further repair rounds of 1 epoch while the guard fails, then K halved
    schedule = [[k, epochs] for k in (0.9, 0.45) for epochs in (0, 1, 2)]
    assert [t[:2] for t in trials] == schedule[:len(trials)]
    assert all(reference - t[2] > 0.0 for t in trials[:-1])  # a step follows only a failed check
    assert len(trials) > 3, trials  # here repair alone did not restore it: K was halved
    # cost: every answer, every further round (one repair each: |R| sample gradients) and every check
    single = TopKUnlearner(copy.deepcopy(original), data, config, initial=initial, **WRECK).unlearn(forget)
    answers, rounds = sum(t[1] == 0 for t in trials), sum(t[1] > 0 for t in trials)
    kept = len(data) - forget.numel()
    assert report.sample_gradients == (answers * single.sample_gradients + rounds * kept
                                       + (1 + len(trials)) * validation[1].numel())


def test_budget_stops_the_guard(mixture):
    data, validation, _, initial, config, original, forget = mixture
    # The first answer is always given: |F| (scoring) + |R| (one repair epoch) + two checks of the
    # held-out data, 0.11x retraining's 20 |R|; a further round (|R| + one check) would take it to
    # 0.19x, past a budget of 0.12x but within 0.3x.
    u = TopKUnlearner(copy.deepcopy(original), data, config, initial=initial, guard=0.0, guard_rounds=2,
                      guard_budget=0.12, guard_data=validation, **WRECK)
    report = u.unlearn(forget)
    assert report.details["guard_stop"] == "budget" and not report.details["guard_met"]
    assert len(report.details["guard_trials"]) == 1 and "budget of 0.12x" in report.how
    assert report.cost_vs_retrain <= 0.12
    roomier = TopKUnlearner(copy.deepcopy(original), data, config, initial=initial, guard=0.0, guard_rounds=2,
                            guard_budget=0.3, guard_data=validation, **WRECK).unlearn(forget)
    assert len(roomier.details["guard_trials"]) > 1 and roomier.cost_vs_retrain <= 0.3


def test_reference_is_the_original_accuracy_across_requests_and_saved_state(mixture):
    data, validation, _, initial, config, original, forget = mixture
    options = dict(initial=initial, guard=0.02, guard_data=validation, guard_budget=None, **WRECK)
    u = RandomKUnlearner(copy.deepcopy(original), data, config, **options)
    first = u.unlearn(forget[:20])
    reference = accuracy(original, *validation)
    assert first.details["guard_accuracy_before"] == reference
    state = copy.deepcopy(u.state_dict())
    second = u.unlearn(forget[20:])
    assert second.details["guard_accuracy_before"] == reference
    resumed = RandomKUnlearner(copy.deepcopy(original), data, config, **options)
    resumed.load_state_dict(state)
    again = resumed.unlearn(forget[20:])
    assert again.details["guard_accuracy_before"] == reference
    assert torch.equal(torch.cat([p.reshape(-1) for p in resumed.model.parameters()]),
                       torch.cat([p.reshape(-1) for p in u.model.parameters()]))


def test_accuracy_reads_per_position_targets_skipping_padding():
    model = torch.nn.Identity()
    logits = torch.tensor([[[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]]])  # predicts 0, 1, 0
    assert accuracy_guard.accuracy(model, logits, torch.tensor([[0, 0, -100]])) == 0.5
