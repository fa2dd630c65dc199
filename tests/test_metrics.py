"""Metrics and membership inference against independent computations (sklearn's ROC AUC, hand
counts), and the FR 'n/a' rule."""
import math

import numpy as np
import pytest
import torch

from unlearn_ext import metrics, mia


def test_loss_auc_equals_sklearn_roc_auc_with_ties():
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(0)
    members = np.round(rng.exponential(0.5, 57), 1)     # rounding makes ties on purpose
    others = np.round(rng.exponential(1.0, 43), 1)
    expected = roc_auc_score(np.r_[np.ones(57), np.zeros(43)], -np.r_[members, others])
    assert mia.loss_auc(torch.tensor(members), torch.tensor(others)) == pytest.approx(expected, abs=1e-12)
    assert mia.loss_auc(torch.zeros(5), torch.ones(5)) == 1.0
    assert mia.loss_auc(torch.ones(5), torch.ones(5)) == 0.5
    assert math.isnan(mia.loss_auc(torch.zeros(0), torch.ones(3)))


def test_forgetting_rate_and_its_na_rule():
    fr, raw, note = metrics.forgetting_rate(1.0, 0.9, 0.8, forget_size=50)   # gap of 10 samples
    assert fr == pytest.approx(0.5) and raw == pytest.approx(0.1) and "10" in note
    fr, raw, note = metrics.forgetting_rate(1.0, 0.95, 0.98, forget_size=50)  # gap of 1 sample
    assert fr is None and note.startswith("n/a") and raw == pytest.approx(0.05)
    assert metrics.retention_rate(0.9, 1.0) == pytest.approx(0.9)


def test_distance_ratio_and_accuracy():
    a, b, c = (torch.nn.Linear(3, 2) for _ in range(3))
    assert metrics.distance_ratio(b, b, c) == pytest.approx(1.0)
    assert metrics.distance_ratio(c, b, c) == 0.0
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2)), model.bias.zero_()
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert metrics.accuracy(model, x, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)


def test_classifier_mia_separates_a_memorizing_model_from_a_blind_one():
    """A model whose loss is low exactly on the members (memorization) is called 'member' on F; a
    model that outputs the same for everyone is not distinguishable (efficacy near chance)."""
    torch.manual_seed(0)
    n, d = 400, 8
    x = torch.randn(3 * n, d)
    y = torch.randint(0, 2, (3 * n,))
    members = torch.zeros(3 * n, dtype=torch.bool)
    members[:2 * n] = True  # retain = first n, forget = second n, test = last n

    class Lookup(torch.nn.Module):  # confident and right on members, unsure elsewhere
        def forward(self, inputs):
            idx = (inputs[:, None, :] == x[None]).all(-1).float().argmax(1)
            right = torch.nn.functional.one_hot(y[idx], 2).float()
            return torch.where(members[idx][:, None], 8 * right, 0.2 * right)

    split = lambda s: (x[s], y[s])  # noqa: E731
    retain, forget, test = split(slice(0, n)), split(slice(n, 2 * n)), split(slice(2 * n, 3 * n))
    assert mia.efficacy(Lookup(), retain, test, forget) > 0.95
    blind = torch.nn.Linear(d, 2)
    with torch.no_grad():
        blind.weight.zero_(), blind.bias.zero_()
    # same output everywhere: the forget set is called members exactly as often as test samples
    assert mia.efficacy(blind, retain, test, forget) == mia.efficacy(blind, retain, test, test)
    assert mia.efficacy(Lookup(), retain, test, test) < 0.05


def test_measuring_keeps_every_modules_training_flag():
    """A frozen BatchNorm in a model in training mode (bn.eval() after model.train()) stays frozen
    after a measurement: a loop that measures accuracy between steps would otherwise train the
    layer's statistics from then on (and the engine's loop guard refuses the changed mode)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.2),
                                torch.nn.Linear(4, 3))
    model.train()
    model[1].eval()
    modes = [m.training for m in model.modules()]
    metrics.accuracy(model, torch.randn(8, 4), torch.arange(8) % 3)
    assert [m.training for m in model.modules()] == modes
