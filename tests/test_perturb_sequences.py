"""What users do that no single-request test covers, for this session's perturbation variants --
the adaptive K (AdaptiveTopKUnlearner) and Top-K with the grad_ratio score: sequences of requests
(forgotten ids accumulate, repeated ids are idempotent, unknown ids are refused naming them,
nothing changed), the second request never reading what the first forgot, a restart through the
deletion ledger in the middle of a sequence giving what continuing in memory gives, and saved state
of another ratio_floor / ladder / stop statistic / held-out set refused naming the field (the
fingerprint)."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from unlearn_ext.data import TrainingData, retrain_cost
from unlearn_ext.ledger import DeletionLedger
from unlearn_ext.parameters import trainable
from unlearn_ext.perturb import AdaptiveTopKUnlearner, TopKUnlearner
from unlearn_ext.unlearner import UnknownIdsError

from conftest import requires_compiled
from test_perturb_adaptive import memorized  # noqa: F401  (the module-scoped fixture: a model that memorized)

pytestmark = requires_compiled

FIRST = torch.arange(0, 160, 10)        # 16 ids
SECOND = torch.arange(5, 160, 10)[:8]   # 8 other ids


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in trainable(model).values()])


def _adaptive(model, data, config, holdout, **overrides):
    return AdaptiveTopKUnlearner(model, data, config, holdout=holdout, repair_epochs=1, **overrides)


def _grad_ratio(model, data, config, holdout, **overrides):
    return TopKUnlearner(model, data, config, score="grad_ratio", perturbation="dampen", k=0.1, repair_epochs=1,
                         **overrides)


BUILDERS = {"topk-adaptive": _adaptive, "topk-grad_ratio": _grad_ratio}


@pytest.fixture(params=sorted(BUILDERS))
def build(request, memorized):  # noqa: F811
    """(a function model -> unlearner of this variant, the memorized fixture)."""
    data, config, original, holdout = memorized
    return (lambda model, data=data, **overrides: BUILDERS[request.param](model, data, config, holdout, **overrides),
            memorized)


def test_requests_accumulate_repeats_are_idempotent_unknown_ids_refused(build):
    make, (data, config, original, holdout) = build
    u = make(copy.deepcopy(original))
    first = u.unlearn(FIRST)
    assert first.status == "unlearned" and u.forgotten.tolist() == FIRST.tolist()
    # A second request naming new ids and some already forgotten: only the new ones are processed,
    # the others listed as repeats; retraining's cost is that of retraining without the union.
    second = u.unlearn(torch.cat([SECOND, FIRST[:3], SECOND[:1]]))
    union = torch.cat([FIRST, SECOND]).unique()
    assert second.status == "unlearned"
    assert second.ids == SECOND.tolist() and second.repeats == FIRST[:3].tolist()
    assert second.duplicates == SECOND[:1].tolist()
    assert u.forgotten.tolist() == union.tolist()
    assert second.retrain_sample_gradients == retrain_cost(data, config, union)
    # The union again (in another order): nothing to do, nothing changed.
    weights, requests = _flat(u.model).clone(), u.requests
    again = u.unlearn(union.flip(0))
    assert again.status == "already-forgotten" and not again.weights_changed and again.ids == []
    assert again.repeats == union.tolist()
    assert torch.equal(_flat(u.model), weights) and u.requests == requests
    assert u.forgotten.tolist() == union.tolist()
    # Unknown ids (beside a valid new one): refused, naming each of them, nothing changed.
    with pytest.raises(UnknownIdsError, match=r"\[160, 999\]"):
        u.unlearn([1, 999, 160])
    assert torch.equal(_flat(u.model), weights) and u.requests == requests
    assert u.forgotten.tolist() == union.tolist()
    # ... and the valid id alone is still forgettable afterwards.
    assert u.unlearn([1]).status == "unlearned" and 1 in u.forgotten.tolist()


def test_second_request_never_reads_the_rows_forgotten_before(build):
    """After the first request, the forgotten rows' content must not matter: the same state restored
    over data whose forgotten rows are replaced by garbage gives the same second request, bit for bit
    (R, the ratio score's retained pass and the repair all exclude every forgotten id)."""
    make, (data, config, original, holdout) = build
    u = make(copy.deepcopy(original))
    u.unlearn(FIRST)
    state = u.state_dict()
    x, y = data.inputs.clone(), data.targets.clone()
    rows = data.rows(FIRST)
    x[rows] = 50.0 * torch.randn(len(rows), x.shape[1], generator=torch.Generator().manual_seed(9))
    y[rows] = (y[rows] + 1) % 3
    garbled = TrainingData(x, y, ids=data.ids)
    other = make(copy.deepcopy(original), data=garbled)
    other.load_state_dict(state)
    a, b = u.unlearn(SECOND), other.unlearn(SECOND)
    assert torch.equal(_flat(u.model), _flat(other.model))
    assert a.details == b.details


def test_restart_mid_sequence_gives_what_continuing_in_memory_gives(build, tmp_path):
    """Two requests in memory against: the first through a ledger, the process 'restarts' (a fresh
    unlearner on a fresh copy of the original, restored from the ledger's files), the second
    request. Same weights bit for bit, same report details, same forgotten ids; the ledger's
    requests are both recorded."""
    make, (data, config, original, holdout) = build
    memory = make(copy.deepcopy(original))
    in_memory = [memory.unlearn(FIRST), memory.unlearn(SECOND)]
    with DeletionLedger(make(copy.deepcopy(original)), str(tmp_path)) as ledger:
        ledger.forget(FIRST)
    fresh = make(copy.deepcopy(original))
    with DeletionLedger(fresh, str(tmp_path)) as reopened:
        assert reopened.forgotten == FIRST.tolist() and fresh.requests == 1
        second = reopened.forget(SECOND)
        assert [r["ids"] for r in reopened.requests] == [FIRST.tolist(), SECOND.tolist()]
    assert torch.equal(_flat(fresh.model), _flat(memory.model))
    assert second.details == in_memory[1].details
    assert fresh.forgotten.tolist() == memory.forgotten.tolist()


@pytest.mark.parametrize("variant, saved, reopened, field", [
    ("topk-grad_ratio", dict(ratio_floor=0.1), dict(ratio_floor=0.5), "ratio_floor"),
    ("topk-adaptive", {}, dict(ladder=(0.02, 0.1, 0.3)), "ladder"),
    ("topk-adaptive", {}, dict(stop_statistic="median"), "stop_statistic"),
    ("topk-adaptive", {}, dict(holdout="other"), "holdout_sha256"),
    ("topk-adaptive", dict(score="grad_ratio", ratio_floor=0.1), dict(score="grad_ratio", ratio_floor=0.0),
     "ratio_floor"),
])
def test_state_of_another_configuration_is_refused_naming_the_field(memorized, tmp_path, variant, saved,  # noqa: F811
                                                                     reopened, field):
    data, config, original, holdout = memorized
    make = BUILDERS[variant]
    reopened = dict(reopened)
    reopen_holdout = holdout
    if reopened.pop("holdout", None) == "other":  # other held-out points: the same set less its first point
        reopen_holdout = (holdout[0][1:], holdout[1][1:])
    with DeletionLedger(make(copy.deepcopy(original), data, config, holdout, **saved), str(tmp_path)) as ledger:
        ledger.forget(FIRST)
    other = make(copy.deepcopy(original), data, config, reopen_holdout, **reopened)
    with pytest.raises(ValueError, match=rf"another model or configuration \(differs in: .*{field}"):
        DeletionLedger(other, str(tmp_path))
    # refused before anything was loaded
    assert torch.equal(_flat(other.model), _flat(original)) and other.forgotten.numel() == 0
    # the same configuration opens it
    with DeletionLedger(make(copy.deepcopy(original), data, config, holdout, **saved), str(tmp_path)) as same:
        assert same.forgotten == FIRST.tolist()


def _reinitialized(model, seed):
    other = copy.deepcopy(model)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.normal_(0.0, 0.1)
    return other


@pytest.mark.parametrize("saved, reopened, field", [
    ({}, dict(config_lr_factor=2.0), "repair_lr"),                                   # another training schedule
    (dict(perturbation="ascent"), dict(perturbation="ascent", ascent_step=0.05), "ascent_step"),
    (dict(perturbation="ascent"), dict(perturbation="ascent", ascent_max_steps=7), "ascent_max_steps"),
    (dict(initial=0), dict(initial=1), "initial_sha256"),                             # other stored initial weights
])
def test_topk_state_of_another_repair_ascent_or_initial_is_refused(memorized, tmp_path, saved, reopened,  # noqa: F811
                                                                  field):
    """The fields that decide what the next request does beyond the selection: the repair's learning
    rate (from the training schedule), normalized ascent's step and cap, and the initial weights that
    reset-to-initial writes back."""
    data, config, original, holdout = memorized

    def make(kw):
        kw = dict(kw)
        cfg = config
        if "config_lr_factor" in kw:
            cfg = dataclasses.replace(config, lr=config.lr * kw.pop("config_lr_factor"))
        if "initial" in kw:
            kw["initial"] = _reinitialized(original, kw["initial"])
        return TopKUnlearner(copy.deepcopy(original), data, cfg, holdout=holdout, k=0.05, repair_epochs=1, **kw)

    with DeletionLedger(make(saved), str(tmp_path)) as ledger:
        ledger.forget(FIRST)
    with pytest.raises(ValueError, match=rf"another model or configuration \(differs in: .*{field}"):
        DeletionLedger(make(reopened), str(tmp_path))
    with DeletionLedger(make(saved), str(tmp_path)) as same:
        assert same.forgotten == FIRST.tolist()


def test_adaptive_rungs_restart_from_the_whole_state_buffers_included(memorized):  # noqa: F811
    """Each rung of the adaptive K starts from the model before the request, buffers included: a
    buffer a rung's repair changes (BatchNorm-like running statistics, emulated by a module that
    counts its forward passes in training mode) is restored before the next rung, so the kept
    model equals a fixed-K run at the chosen K, buffer and weights alike."""
    data, config, original, holdout = memorized

    class CountingNet(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.register_buffer("train_calls", torch.zeros(()))

        def forward(self, x):
            if self.training:
                self.train_calls += 1
            return self.inner(x)

    base = CountingNet(copy.deepcopy(original))
    adaptive = AdaptiveTopKUnlearner(copy.deepcopy(base), data, config, holdout=holdout, repair_epochs=1)
    report = adaptive.unlearn(FIRST)
    chosen = report.details["k_chosen"]
    assert len(report.details["k_trials"]) >= 2, "the fixture should need more than one rung"
    fixed = TopKUnlearner(copy.deepcopy(base), data, config, holdout=holdout, k=chosen, repair_epochs=1)
    fixed.unlearn(FIRST)
    assert torch.equal(adaptive.model.train_calls, fixed.model.train_calls)
    assert torch.equal(_flat(adaptive.model), _flat(fixed.model))
