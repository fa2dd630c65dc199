"""The `Unlearner` contract, checked the same way for every method there is: each method of the
harness registry (evaluate/methods.py: AVAILABLE and VARIANTS) and each method the engine wraps
(engine.METHODS, built from a user's loop). The cases are read from the registries themselves, so a
method added to either is checked here too, and fails this test until it keeps the contract:

  * id hygiene: empty, non-integer and unknown ids refused by name, nothing changed;
  * repeats: duplicates counted once, a request of forgotten ids answers 'already-forgotten' and
    changes nothing;
  * one state format: the model's weights and buffers by parameter name ("params", "buffers") and
    "forgotten"; the fingerprint names the parameters' shapes as {name: shape};
  * retraining's cost: every answered request carries what retraining without the forgotten ids
    costs, as the unlearner's one `retrain_cost` says;
  * a state round trip: a fresh unlearner given the saved state answers the next request exactly
    as the one that saved it;
  * a ledger of another data set is refused, naming what differs;
  * a ledger restarted mid-sequence ends exactly where the uninterrupted sequence ends.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

import unlearn_ext as ue
from unlearn_ext import engine as engine_module
from unlearn_ext.evaluate import methods as registry
from unlearn_ext.ledger import DeletionLedger
from unlearn_ext.parameters import parameter_shapes, trainable
from unlearn_ext.unlearner import UnknownIdsError

from ledger_methods_setup import blobs, requests_without_timing, same

FIRST, SECOND, THIRD = [3, 3, 4], [5, 7, 20], [11]
EPOCHS, BATCH = 4, 16


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def harness_run(shift: float) -> registry.Run:
    """A tiny harness run; `shift` moves one input so the data set (and its digest) differs."""
    x, y = blobs()
    x[0, 0] += shift
    data = ue.TrainingData(x, y)
    config = ue.SGDConfig(epochs=EPOCHS, batch_size=BATCH, lr=0.3, weight_decay=1e-3)
    initial = mlp()
    original = copy.deepcopy(initial)
    ue.train_sgd(original, data, config)
    return registry.Run("blobs", "mlp", 0, data, initial, config, original, 0.0, holdout=blobs(n=24, seed=1))


class HarnessCase:
    def __init__(self, name: str):
        self.method = (registry.AVAILABLE.get(name) or registry.VARIANTS[name])
        self.prepared = {}

    def unlearner(self, shift: float = 0.0):
        if shift not in self.prepared:
            run = harness_run(shift)
            self.prepared[shift] = (run, self.method.prepare(run))
        run, prepared = self.prepared[shift]
        return self.method.build(run, copy.deepcopy(prepared))


class EngineCase:
    """The user's loop through UnlearningEngine; every unlearner is a fresh, identical training."""

    OPTIONS = {"pcmu": dict(clip_norm=1.0, tau=0.01, sigma=0.01, max_request=2)}  # PCMU has no defaults

    def __init__(self, name: str):
        self.name = name

    def unlearner(self, shift: float = 0.0):
        x, y = blobs()
        x[0, 0] += shift
        model = mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
        engine = ue.UnlearningEngine()
        model, optimizer, loader = engine.make_unlearnable(
            model, optimizer, torch.utils.data.TensorDataset(x, y), method=self.name, epochs=EPOCHS,
            batch_size=BATCH, anchors=2, **self.OPTIONS.get(self.name, {}))
        loss_fn = torch.nn.CrossEntropyLoss()
        for _ in range(EPOCHS):
            for xb, yb in loader:
                optimizer.zero_grad()
                loss_fn(model(xb), yb).backward()
                optimizer.step()
        return engine.unlearner()


CASES = ([pytest.param((HarnessCase, n), id=f"harness-{n}") for n in (*registry.AVAILABLE, *registry.VARIANTS)]
         + [pytest.param((EngineCase, n), id=f"engine-{n}") for n in engine_module.METHODS])
_cases = {}


@pytest.fixture(params=CASES)
def case(request):
    kind, name = request.param
    if (kind, name) not in _cases:  # one training per method for the whole module
        _cases[kind, name] = kind(name)
    return _cases[kind, name]


def test_the_cases_cover_every_registered_method():
    names = {(kind.__name__, name) for ((kind, name),) in (p.values for p in CASES)}
    assert {("HarnessCase", n) for n in (*registry.AVAILABLE, *registry.VARIANTS)} <= names
    assert {("EngineCase", n) for n in engine_module.METHODS} <= names
    assert not registry.PLANNED or all(n not in registry.AVAILABLE for n in registry.PLANNED)


def test_ids_are_checked_before_any_work(case):
    u = case.unlearner()
    before = u.state_dict()
    with pytest.raises(UnknownIdsError, match=r"\[999\]"):
        u.unlearn([1, 999])
    with pytest.raises(ValueError, match="empty deletion request"):
        u.unlearn([])
    with pytest.raises(TypeError, match="ids must be integers"):
        u.unlearn([1.5])
    with pytest.raises(TypeError, match="ids must be integers"):
        u.unlearn([5, True])
    assert same(u.state_dict(), before) and u.forgotten.tolist() == []


def test_duplicates_and_repeats(case):
    u = case.unlearner()
    first = u.unlearn(FIRST)
    assert first.ids == [3, 4] and first.duplicates == [3] and u.forgotten.tolist() == [3, 4]
    assert first.status in ue.unlearner.STATUSES and first.status != "already-forgotten"
    after = u.state_dict()
    again = u.unlearn([4, 3])
    assert again.status == "already-forgotten" and again.repeats == [3, 4] and again.ids == []
    assert not again.weights_changed and same(u.state_dict(), after)
    mixed = u.unlearn([4, 11])
    assert mixed.repeats == [4] and mixed.ids == [11] and u.forgotten.tolist() == [3, 4, 11]


def test_one_state_format_one_fingerprint_shape_one_retraining_cost(case):
    u = case.unlearner()
    report = u.unlearn(FIRST)
    state, fingerprint = u.state_dict(), u.fingerprint()
    assert {"params", "buffers", "forgotten"} <= set(state)
    assert list(state["params"]) == list(trainable(u.model))
    assert list(state["buffers"]) == [k for k, _ in u.model.named_buffers()]
    assert fingerprint["shapes"] == parameter_shapes(u.model)
    json.dumps(fingerprint)  # the ledger stores it as JSON
    assert report.retrain_sample_gradients == u.retrain_cost(u.forgotten) > 0


def test_a_saved_state_answers_like_the_unlearner_that_saved_it(case):
    u = case.unlearner()
    u.unlearn(FIRST)
    u.unlearn(SECOND)
    state = copy.deepcopy(u.state_dict())
    fresh = case.unlearner()
    fresh.load_state_dict(state)
    assert same(fresh.state_dict(), state)
    a, b = u.unlearn(THIRD), fresh.unlearn(THIRD)
    assert same(u.state_dict(), fresh.state_dict())
    assert (a.status, a.how, a.ids, a.sample_gradients) == (b.status, b.how, b.ids, b.sample_gradients)


def test_a_ledger_of_another_data_set_is_refused(case, tmp_path):
    with DeletionLedger(case.unlearner(), str(tmp_path)) as ledger:
        ledger.forget(FIRST)
    with pytest.raises(ValueError, match=r"another model or configuration \(differs in: .*data_sha256"):
        DeletionLedger(case.unlearner(shift=0.5), str(tmp_path))


def test_a_ledger_restarted_mid_sequence_ends_as_the_uninterrupted_one(case, tmp_path):
    with DeletionLedger(case.unlearner(), str(tmp_path / "straight")) as ledger:
        for request in (FIRST, SECOND, THIRD):
            ledger.forget(request)
        expected_state, expected_log = ledger.unlearner.state_dict(), requests_without_timing(ledger)
    with DeletionLedger(case.unlearner(), str(tmp_path / "restarted")) as ledger:
        ledger.forget(FIRST)
        ledger.forget(SECOND)
    with DeletionLedger(case.unlearner(), str(tmp_path / "restarted")) as ledger:
        ledger.forget(THIRD)
        assert same(ledger.unlearner.state_dict(), expected_state)
        assert requests_without_timing(ledger) == expected_log
