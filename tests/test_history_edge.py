"""The history methods at the edge of stability: the eta * lambda_max estimate recorded in training,
the decision before any work (a fallback costs what retraining costs), Mini-Unlearning's fixed point
in unstable directions and DeltaGrad's damped quasi-Newton steps (docs/design.md §6)."""
from __future__ import annotations

import copy

import pytest
import torch

import unlearn_ext as ue
from unlearn_ext.mini.curvature import Spectrum, exact_spectrum
from unlearn_ext.mini.deltagrad import CompactLBFGS
from unlearn_ext.mini.propagate import propagate_segment
from unlearn_ext.mini.sharpness import SHARPNESS_KEY, recorded_edge
from unlearn_ext.mini.vectors import FlatModel

from history_methods_setup import classification, flat, linear_regression
from user_models import Pairs

FORGET = [1, 5, 7, 20]


def hessian_top(init, data):
    """lambda_max of the mean training loss's Hessian at the initial weights, from the whole Hessian
    (d products, eigendecomposed): constant for linear regression."""
    f = FlatModel(copy.deepcopy(init), data)
    return float(exact_spectrum(f, f.flat(), data.ids, 0.0).thetas.max())


def regression_runs(edge):
    """Full-batch linear regression at lr = edge / lambda_max, recorded for both methods."""
    data, init = linear_regression(n=30, d=3, scale=0.5)
    config = ue.SGDConfig(epochs=6, batch_size=len(data), lr=edge / hessian_top(init, data))
    mini_model, mini_store = copy.deepcopy(init), ue.mini_store(init)
    ue.train_recording_anchors(mini_model, data, config, mini_store, anchors=3)
    step_model, step_store = copy.deepcopy(init), ue.step_store(init, params="fp32", grads="fp32")
    ue.train_recording_steps(step_model, data, config, step_store)
    return data, init, config, (mini_model, mini_store), (step_model, step_store)


@pytest.fixture(scope="module")
def unstable():
    return regression_runs(2.3)


def test_recorded_estimate_is_eta_lambda_max(unstable):
    """On a quadratic with d = 3 the recorded Lanczos estimate is the exact eta * lambda_max."""
    data, _, config, (_, mini_store), (_, step_store) = unstable
    expected = config.lr_at(0) * hessian_top(init := unstable[1], data)
    for store in (mini_store, step_store):
        values = store.run_info[SHARPNESS_KEY]
        assert values and all(v == pytest.approx(expected, rel=1e-4) for _, v in values)
        assert recorded_edge(store.run_info)[0] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("method", ["mini", "deltagrad"])
def test_fallback_decided_before_any_work_costs_retraining(unstable, method):
    """eta * lambda_max = 2.3 >= 2 was recorded in training: the request falls back before any
    other work, so it costs at most 1.05x retraining's sample-gradients (exactly 1x here) and its
    answer is retraining's."""
    data, init, config, (mini_model, mini_store), (step_model, step_store) = unstable
    if method == "mini":
        m = copy.deepcopy(mini_model)
        report = ue.MiniUnlearner(m, data, mini_store, lanczos_steps=4).unlearn(FORGET)
    else:
        m = copy.deepcopy(step_model)
        report = ue.DeltaGradUnlearner(m, data, step_store).unlearn(FORGET)
    assert report.status == "fallback"
    assert f"recorded eta_t * lambda_max = {recorded_edge(mini_store.run_info)[0]:.3g} >= 2" in report.reason
    assert recorded_edge(mini_store.run_info)[0] == pytest.approx(2.3, rel=1e-4)
    assert report.sample_gradients <= 1.05 * report.retrain_sample_gradients
    assert torch.allclose(flat(m, data), flat(ue.retrain(init, data, config, FORGET), data), rtol=1e-5, atol=1e-5)


def test_stable_run_is_not_decided_early():
    """Below the edge the estimate is recorded and the request is served as before."""
    data, init, config, (mini_model, mini_store), (step_model, step_store) = regression_runs(1.0)
    assert recorded_edge(mini_store.run_info)[0] == pytest.approx(1.0, rel=1e-4)
    report = ue.MiniUnlearner(copy.deepcopy(mini_model), data, mini_store, lanczos_steps=4).unlearn(FORGET)
    assert report.status == "unlearned", report.reason
    assert report.details["recorded_eta_lambda_max"] == pytest.approx(1.0, rel=1e-4)


def test_history_without_estimate_is_checked_as_before():
    """A history with no recorded estimate (e.g. the user's own loop) decides after the curvature,
    as before: the late check names the Ritz values."""
    data, init, config, (mini_model, mini_store), _ = regression_runs(2.3)
    mini_store._run_info.pop(SHARPNESS_KEY)
    report = ue.MiniUnlearner(copy.deepcopy(mini_model), data, mini_store, lanczos_steps=4).unlearn(FORGET)
    assert report.status == "fallback" and "eta_t * max theta" in report.reason
    assert report.sample_gradients > report.retrain_sample_gradients  # what the early decision saves


def spectrum(thetas, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(d, len(thetas), generator=g, dtype=torch.float64))
    t = torch.tensor(thetas, dtype=torch.float64)
    return Spectrum(basis=U, thetas=t, h_perp=float(t[t > 0].min()), ritz=t.tolist())


def test_fixed_point_in_directions_at_the_edge():
    """A direction with eta * theta >= 2 takes -delta/theta; the others are propagated unchanged."""
    spec = spectrum([25.0, 3.0, 0.5])
    etas = torch.full((40,), 0.1, dtype=torch.float64)      # eta * theta = 2.5, 0.3, 0.05
    g = torch.Generator().manual_seed(1)
    e0, delta = (torch.randn(5, generator=g, dtype=torch.float64) for _ in range(2))
    plain = propagate_segment(e0, spec, etas, None, delta)
    edged = propagate_segment(e0, spec, etas, None, delta, edge=2.0)
    U = spec.basis
    assert float(U[:, 0] @ edged) == pytest.approx(-float(U[:, 0] @ delta) / 25.0, rel=1e-12)
    assert abs(float(U[:, 0] @ plain)) > 1e6                  # the plain recursion diverges there
    rest = torch.eye(5, dtype=torch.float64) - torch.outer(U[:, 0], U[:, 0])
    assert torch.allclose(rest @ edged, rest @ plain, atol=1e-7)  # plain is ~1e6 there: its roundings
    calm = spectrum([3.0, 0.5])
    assert torch.equal(propagate_segment(e0, calm, etas, None, delta, edge=2.0),
                       propagate_segment(e0, calm, etas, None, delta))


@pytest.mark.parametrize("seed", [3, 4])
def test_capped_product_caps_the_eigenvalues(seed):
    """capped_product against B built densely: in-span eigenvalues >= above become cap, a sigma >=
    above becomes the smallest positive in-span eigenvalue (at most cap)."""
    g = torch.Generator().manual_seed(seed)
    d = 6
    H = torch.randn(d, d, generator=g, dtype=torch.float64)
    H = H @ H.T + 0.1 * torch.eye(d, dtype=torch.float64)
    S = torch.randn(d, 2, generator=g, dtype=torch.float64)
    model = CompactLBFGS(S, H @ S)
    B = torch.stack([model.product(e) for e in torch.eye(d, dtype=torch.float64)], 1)
    values, vectors = torch.linalg.eigh((B + B.T) / 2)
    above = float(values.max()) * 0.5
    cap = above / 4
    Q, span_values, _ = model._span_eigen()
    positive = span_values[span_values > 0]
    sigma_new = min(float(positive.min()), cap)
    outside = torch.eye(d, dtype=torch.float64) - Q @ Q.T
    # B restricted: in-span eigenpairs capped, the complement at sigma or its replacement
    inside = Q.T @ B @ Q
    iv, ivec = torch.linalg.eigh((inside + inside.T) / 2)
    iv = torch.where(iv >= above, torch.full_like(iv, cap), iv)
    expected_B = Q @ ivec @ torch.diag(iv) @ ivec.T @ Q.T + (sigma_new if model.sigma >= above else model.sigma) * outside
    v = torch.randn(d, generator=g, dtype=torch.float64)
    assert torch.allclose(model.capped_product(v, above, cap), expected_B @ v, atol=1e-9)


def test_bad_unstable_options_are_refused(unstable):
    data, init, config, (mini_model, mini_store), (step_model, step_store) = unstable
    with pytest.raises(ValueError, match="unstable must be one of"):
        ue.MiniUnlearner(copy.deepcopy(mini_model), data, mini_store, unstable="damp")
    with pytest.raises(ValueError, match="unstable must be 'refuse' or 'damp'"):
        ue.DeltaGradUnlearner(copy.deepcopy(step_model), data, step_store, unstable="equilibrium")
    momentum = ue.SGDConfig(epochs=2, batch_size=10, lr=0.01, momentum=0.5)
    model, store = copy.deepcopy(init), ue.mini_store(init)
    ue.train_recording_anchors(model, data, momentum, store, anchors=2)
    with pytest.raises(ValueError, match="derived for plain SGD"):
        ue.MiniUnlearner(model, data, store, unstable="equilibrium")


def test_equilibrium_serves_a_request_refuse_sends_to_retraining():
    """A logistic model trained at a large lr: where "refuse" falls back, "equilibrium" answers, and
    its answer is closer to retraining than doing nothing (d/d0 < 1)."""
    data, init = classification()
    config = ue.SGDConfig(epochs=8, batch_size=len(data), lr=8.0 / hessian_top(init, data))
    model, store = copy.deepcopy(init), ue.mini_store(init)
    ue.train_recording_anchors(model, data, config, store, anchors=3)
    retrained = ue.retrain(init, data, config, FORGET)
    edge = recorded_edge(store.run_info)[0]
    got, report = copy.deepcopy(model), None
    report = ue.MiniUnlearner(got, data, store, unstable="equilibrium", curvature_samples=10**6,
                              lanczos_steps=8).unlearn(FORGET)
    refused = ue.MiniUnlearner(copy.deepcopy(model), data, store).unlearn(FORGET)
    assert edge >= 2 and refused.status == "fallback"
    assert report.status == "unlearned", report.reason
    assert report.details["edge_directions"] >= 1
    assert ue.distance_ratio(got, model, retrained) < 1



def users_quadratic_loop(method: str, edge: float):
    """The user's own loop (torch.optim.SGD, MSELoss with mean reduction, a full-batch DataLoader) on
    linear regression at lr = edge / lambda_max, wrapped by the engine; the global RNG is seeded
    first and read after training, to show what the loop's own randomness would see."""
    g = torch.Generator().manual_seed(0)
    x = 0.5 * torch.randn(30, 3, generator=g)
    y = (x @ torch.randn(3, 1, generator=g) + 0.3 * torch.randn(30, 1, generator=g))
    x1 = torch.cat([x, torch.ones(30, 1)], 1).double()
    lam = float(torch.linalg.eigvalsh(2 / 30 * x1.T @ x1).max())  # the mean squared error's Hessian
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=edge / lam)
    loader = torch.utils.data.DataLoader(Pairs(x, y), batch_size=30)
    loss_fn = torch.nn.MSELoss()
    engine = ue.UnlearningEngine()
    model, optimizer, loader = engine.make_unlearnable(model, optimizer, loader, method=method, epochs=6,
                                                       loss_fn=loss_fn)
    torch.manual_seed(1)
    for _ in range(6):
        for xb, yb in loader:
            optimizer.zero_grad()
            loss_fn(model(xb), yb).backward()
            optimizer.step()
    after = torch.rand(3)
    return engine, model, after


@pytest.mark.parametrize("method", ["mini", "deltagrad"])
def test_users_loop_records_the_estimate_and_falls_back_before_any_work(method):
    """The engine records eta_t * lambda_max in the user's loop as the library's recorders do: at
    2.3 the request falls back before any other work (cost = retraining's), and the answer is the
    recipe's retraining. The estimate draws from seeded generators of its own: the loop's global
    RNG sees the same numbers as a loop the engine records nothing in."""
    engine, model, after = users_quadratic_loop(method, 2.3)
    _, _, after_plain = users_quadratic_loop("retrain", 2.3)
    assert torch.equal(after, after_plain)
    unlearner = engine.unlearner()
    edge = recorded_edge(unlearner.store.run_info)
    assert edge is not None and edge[0] == pytest.approx(2.3, rel=1e-3)
    report = unlearner.unlearn(FORGET)
    assert report.status == "fallback" and f"recorded eta_t * lambda_max = {edge[0]:.3g} >= 2" in report.reason
    assert report.sample_gradients <= 1.05 * report.retrain_sample_gradients
    retrained = ue.retrain(engine.run.initial, engine.data, engine.recipe, FORGET)
    assert torch.allclose(flat(model, engine.data), flat(retrained, engine.data), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["mini", "deltagrad"])
def test_users_stable_loop_is_served(method):
    """Below the edge the recorded estimate lets the request through to the method."""
    engine, _, _ = users_quadratic_loop(method, 1.0)
    unlearner = engine.unlearner()
    assert recorded_edge(unlearner.store.run_info)[0] == pytest.approx(1.0, rel=1e-3)
    report = unlearner.unlearn(FORGET)
    assert report.status == "unlearned", report.reason
