"""DeltaGrad (Wu et al. 2020), judged against retraining, never against itself."""
from __future__ import annotations

import copy

import pytest
import torch

import unlearn_ext as ue
from unlearn_ext.mini import lbfgs_product

from history_methods_setup import classification, flat, gap, recorded_by_torch_sgd

FORGET = [1, 5, 7, 20, 33]


def steps_run(data, init, config, **store_kw):
    model = copy.deepcopy(init)
    store = ue.step_store(model, **store_kw)
    ue.train_recording_steps(model, data, config, store)
    return model, store


@pytest.fixture(scope="module")
def run():
    data, init = classification()
    config = ue.SGDConfig(epochs=10, batch_size=16, lr=lambda t: 0.5 / (1 + 0.02 * t), weight_decay=1e-3)
    model, store = steps_run(data, init, config, params="fp32", grads="fp32")
    return data, init, config, model, store, ue.retrain(init, data, config, FORGET)


def forget(model, data, store, ids=FORGET, **kw):
    m = copy.deepcopy(model)
    return m, ue.DeltaGradUnlearner(m, data, store, **kw).unlearn(ids)


def test_every_step_exact_equals_retraining(run):
    data, init, config, model, store, retrained = run
    got, report = forget(model, data, store, period=1)
    assert report.status == "unlearned"
    assert torch.allclose(flat(got, data), flat(retrained, data), atol=1e-6)


def test_quasi_newton_steps_move_toward_retraining(run):
    data, init, config, model, store, retrained = run
    got, report = forget(model, data, store, burn_in=5, period=4, memory=2)
    assert report.status == "unlearned", report.reason
    assert report.details["exact_steps"] < len(store.steps) / 2
    assert gap(got, model, retrained, data) < 0.2
    assert report.sample_gradients < report.retrain_sample_gradients
    assert report.history_bytes_read >= store.nbytes  # the whole history is replayed


def test_int8_history_works_on_the_codes(run):
    data, init, config, model, store, retrained = run
    model8, store8 = steps_run(data, init, config)  # int8 params (deltas) and grads
    got, report = forget(model8, data, store8, burn_in=5, period=4)
    assert report.status == "unlearned", report.reason
    assert gap(got, model8, retrained, data) < 0.3
    # (batch ids, 8 bytes each, dominate on this 15-parameter model)
    assert report.history_bytes_read < forget(model, data, store, burn_in=5, period=4)[1].history_bytes_read


def test_sequential_requests_equal_one_combined(run):
    data, init, config, model, store, _ = run
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    seq = ue.DeltaGradUnlearner(a, data, store)
    seq.unlearn([1, 5])
    assert seq.unlearn([5]).status == "already-forgotten"
    seq.unlearn([7, 20, 33])
    ue.DeltaGradUnlearner(b, data, store).unlearn(FORGET)
    assert torch.allclose(flat(a, data), flat(b, data), atol=1e-6)
    with pytest.raises(ue.UnknownIdsError, match="-3"):
        seq.unlearn([-3])


def test_forced_unsafe_configuration_falls_back_to_retraining(run):
    data, init, config, model, store, retrained = run
    got, report = forget(model, data, store, max_prediction_error=0.0)  # any prediction error fires
    assert report.status == "fallback" and "quasi-Newton prediction" in report.reason
    assert torch.allclose(flat(got, data), flat(retrained, data), atol=1e-6)


def test_restart_from_disk_record_equals_in_memory(run, tmp_path):
    data, init, config, model, store, _ = run
    path = str(tmp_path / "steps.uh")
    disk_model, disk = steps_run(data, init, config, params="fp32", grads="fp32", tier="disk", path=path)
    disk.close()
    a, _ = forget(disk_model, data, ue.HistoryStore.open(path, expect=disk_model))
    b, _ = forget(model, data, store)
    assert torch.equal(flat(a, data), flat(b, data))


def test_history_from_torch_optimizer_and_history_recorder(run):
    """A torch.optim.SGD loop recorded by HistoryRecorder (p.grad, batch ids) replays exactly."""
    data, init, config, _, _, retrained = run
    model, store = recorded_by_torch_sgd(data, init, config)
    got, report = forget(model, data, store, period=1)
    assert torch.allclose(flat(got, data), flat(retrained, data), atol=1e-5)
    assert report.retrain_sample_gradients == config.epochs * (len(data) - len(FORGET))


# Momentum (heavy ball, Nesterov) is replayed: tests/test_history_momentum.py, with what stays refused.
@pytest.mark.parametrize("opt, match", [
    (lambda p: torch.optim.AdamW(p, lr=0.1), "AdamW"),
])
def test_adam_refused(opt, match):
    data, model = classification()
    store = ue.step_store(model)
    ue.HistoryRecorder(store, model, opt(model.parameters()))
    with pytest.raises(ue.UnsupportedOptimizerError, match=match):
        ue.DeltaGradUnlearner(model, data, store)


def test_lbfgs_compact_form_equals_bfgs_updates():
    """The compact form is the BFGS recursion from B_0 = sigma I applied to the pairs in order."""
    g = torch.Generator().manual_seed(0)
    d, m = 7, 3
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    A = A @ A.T + torch.eye(d, dtype=torch.float64)
    S = torch.randn(d, m, generator=g, dtype=torch.float64)
    Y = A @ S
    sigma = float(Y[:, -1] @ S[:, -1] / (S[:, -1] @ S[:, -1]))
    B = sigma * torch.eye(d, dtype=torch.float64)
    for i in range(m):
        s, y = S[:, i], Y[:, i]
        Bs = B @ s
        B = B - torch.outer(Bs, Bs) / (s @ Bs) + torch.outer(y, y) / (y @ s)
    v = torch.randn(d, generator=g, dtype=torch.float64)
    assert torch.allclose(lbfgs_product(S, Y, v), B @ v, atol=1e-9)
    assert torch.allclose(lbfgs_product(S, Y, S[:, -1]), Y[:, -1], atol=1e-9)  # secant equation
    # the stability check's lambda_max (computed on span(S, Y) without a d x d matrix)
    from unlearn_ext.mini.deltagrad import CompactLBFGS
    assert CompactLBFGS(S, Y).largest_eigenvalue() == pytest.approx(float(torch.linalg.eigvalsh(B).max()), rel=1e-9)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("m", [1, 2, 3])
def test_lbfgs_largest_eigenvalue_from_the_gram_matrix(seed, m):
    """lambda_max(B) from the 2m x 2m Gram algebra against the dense B, including pairs whose
    curvature along span(S, Y) exceeds sigma (the newest pair's, which holds outside the span), and
    the replay's construction from (dw, dg) pairs against the one from columns."""
    from unlearn_ext.mini.deltagrad import CompactLBFGS
    g = torch.Generator().manual_seed(seed)
    d = 9
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    A = Q @ torch.diag(torch.linspace(0.1, 5.0 * (seed + 1), d, dtype=torch.float64)) @ Q.T
    S = torch.randn(d, m, generator=g, dtype=torch.float64)
    if seed == 3 and m > 1:
        S[:, 0] = S[:, 1] + 1e-3 * S[:, 0]  # nearly collinear steps
    Y = A @ S
    model = CompactLBFGS(S, Y)
    B = torch.stack([model.product(e) for e in torch.eye(d, dtype=torch.float64)], 1)
    want = float(torch.linalg.eigvalsh((B + B.T) / 2).max())
    assert model.largest_eigenvalue() == pytest.approx(want, rel=1e-7)
    assert model.largest_eigenvalue(from_basis=True) == pytest.approx(want, rel=1e-7)  # (damping's numbers)
    rebuilt = CompactLBFGS.from_pairs([(S[:, i], Y[:, i]) for i in range(m)])
    v = torch.randn(d, generator=g, dtype=torch.float64)
    assert torch.allclose(rebuilt.product(v), model.product(v), rtol=1e-12, atol=1e-12)
    assert rebuilt.largest_eigenvalue() == pytest.approx(model.largest_eigenvalue(), rel=1e-12)
