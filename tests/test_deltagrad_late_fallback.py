"""DeltaGrad's fallbacks that fire after its replay began (the stability check at a quasi-Newton
step, the prediction check at an exact step, the retained-loss check at the end): the answer is
retraining's bit for bit, and the cost is retraining's plus only what the replay spent beyond its
exact prefix — the prefix is retraining's own first steps, kept and continued, never paid twice.

The early fallback (decided before any work) is tests/test_history_edge.py's."""
from __future__ import annotations

import copy

import pytest
import torch

import unlearn_ext as ue

from history_methods_setup import classification, flat, recorded_by_torch_sgd

KINDS = ["plain", "heavy-ball", "nesterov"]
# Per kind, a forget set whose replayed answer raises the retained loss a little (measured: +0.03% plain,
# +0.1% with momentum), so that the retained-loss check can be made to fire by a tiny limit.
FORGETS = {"plain": [0, 10, 50, 90], "heavy-ball": [1, 5, 7, 20, 33], "nesterov": [1, 5, 7, 20, 33]}
BURN_IN, PERIOD = 10, 5


def recipe(kind: str) -> ue.SGDConfig:
    """test_deltagrad.py's setting (plain) and test_history_momentum.py's (momentum 0.9 at a tenth
    of the lr), on 120 samples: 80 recorded steps."""
    if kind == "plain":
        return ue.SGDConfig(epochs=10, batch_size=16, lr=lambda t: 0.5 / (1 + 0.02 * t), weight_decay=1e-3)
    return ue.SGDConfig(epochs=10, batch_size=16, lr=lambda t: 0.05 / (1 + 0.02 * t), weight_decay=1e-3,
                        momentum=0.9, nesterov=kind == "nesterov")


def by_hand(data, init, config):
    """The run trained by the user's torch.optim.SGD loop: its history holds no eta * lambda_max
    estimate, so the stability check can only fire during the replay."""
    return recorded_by_torch_sgd(data, init, config)


@pytest.fixture(scope="module", params=KINDS)
def runs(request):
    data, init = classification(n=120)
    config, forget = recipe(request.param), torch.tensor(FORGETS[request.param])
    recorded = copy.deepcopy(init)
    store = ue.step_store(recorded, params="fp32", grads="fp32")
    ue.train_recording_steps(recorded, data, config, store)
    return data, forget, (recorded, store), by_hand(data, init, config), ue.retrain(init, data, config, forget)


def replay_spend(store, forget, prefix_end: int, stop: int, stop_spends: bool, burn_in=BURN_IN,
                 period=PERIOD) -> tuple[int, int]:
    """(the removed samples' gradients in the exact prefix (steps < prefix_end), the replay's spend on
    steps prefix_end..stop-1 (|B| at an exact step: t < burn_in or t - burn_in divisible by the
    period; |B & F| at a quasi-Newton one), plus |B_stop| when the check at `stop` fires after that
    step's exact gradient), counted from the recorded batches: what a fallback may add to
    retraining's cost."""
    prefix, spend = 0, 0
    for t, _, _, ids in store.schedule():
        gone = int(torch.isin(ids, forget).sum())
        if gone == ids.numel() or t > stop:
            continue  # an emptied batch costs nothing
        if t < prefix_end:
            prefix += gone
        elif t < stop:
            spend += int(ids.numel()) if t < burn_in or (t - burn_in) % period == 0 else gone
        elif stop_spends:
            spend += int(ids.numel())
    return prefix, spend


def unlearned(model, data, store, forget, **kw):
    got = copy.deepcopy(model)
    return got, ue.DeltaGradUnlearner(got, data, store, **kw).unlearn(forget)


def test_stability_check_after_the_prefix(runs):
    """A bound below any curvature fires at the first quasi-Newton step (j0 + 1, after the exact step
    j0), before that step's gradient: the request costs retraining plus the prefix's removed-sample
    gradients and step j0's batch, within 1.05x."""
    data, forget, _, (model, store), retrained = runs
    got, report = unlearned(model, data, store, forget, stability_limit=1e-6)
    assert report.status == "fallback" and f"at step {BURN_IN + 1}: the quasi-Newton replay" in report.reason
    assert torch.equal(flat(got, data), flat(retrained, data))
    prefix, spend = replay_spend(store, forget, BURN_IN, BURN_IN + 1, stop_spends=False)
    assert report.sample_gradients == report.retrain_sample_gradients + prefix + spend
    assert report.sample_gradients <= 1.05 * report.retrain_sample_gradients


def test_prediction_check_at_the_first_exact_step_after_the_prefix(runs):
    """No burn-in: the prefix runs until the first pair (steps 0 and 1: at step 0 the gap dw is 0, so
    it gives no pair), and any prediction error fires at the next exact step (step T0)."""
    data, forget, (model, store), _, retrained = runs
    got, report = unlearned(model, data, store, forget, burn_in=0, max_prediction_error=0.0)
    assert report.status == "fallback" and f"exact step {PERIOD} is off" in report.reason
    assert report.details["prefix_steps"] == 2
    assert torch.equal(flat(got, data), flat(retrained, data))
    prefix, spend = replay_spend(store, forget, 2, PERIOD, stop_spends=True, burn_in=0)
    assert report.sample_gradients == report.retrain_sample_gradients + prefix + spend
    assert report.sample_gradients <= 1.05 * report.retrain_sample_gradients


def test_stability_check_late_in_the_replay(runs):
    """A bound between the recorded estimate and the largest eta * lambda_max(B) of the replay fires
    mid-replay: the answer is still retraining's, and the cost is retraining plus only what the
    approximate phase spent (not the prefix again, not from step 0)."""
    data, forget, (model, store), _, retrained = runs
    top = unlearned(model, data, store, forget)[1].details["max_eta_lambda"]
    recorded = max(v for _, v in store.run_info["eta_lambda_max"])
    bound_per_limit = ue.DeltaGradUnlearner(copy.deepcopy(model), data, store).stable_below / 2.0  # default limit 2
    limit = (recorded + top) / 2 / bound_per_limit
    got, report = unlearned(model, data, store, forget, stability_limit=limit)
    assert report.status == "fallback" and "the quasi-Newton replay amplifies" in report.reason
    stop = int(report.reason.split(" at step ")[1].split(":")[0])
    assert stop > BURN_IN
    assert torch.equal(flat(got, data), flat(retrained, data))
    prefix, spend = replay_spend(store, forget, BURN_IN, stop, stop_spends=False)
    assert report.sample_gradients == report.retrain_sample_gradients + prefix + spend


def test_retained_loss_check_at_the_end(runs):
    """The check against doing nothing fires after the whole replay: the fallback continues the
    prefix's run, so it costs retraining plus the approximate phase and the check (measured on the
    weights before the request), never the prefix twice."""
    data, forget, (model, store), _, retrained = runs
    got, report = unlearned(model, data, store, forget, loss_rise_limit=1e-12)
    assert report.status == "fallback" and "retained loss" in report.reason, report.reason
    assert torch.equal(flat(got, data), flat(retrained, data))
    prefix, spend = replay_spend(store, forget, BURN_IN, len(store.steps), stop_spends=False)
    check = len(data) - len(forget)  # every retained sample (fewer than check_samples)
    assert report.sample_gradients == report.retrain_sample_gradients + prefix + spend + check



def test_exact_prefix_is_retrainings_own_run(runs):
    """A burn-in as long as the run makes every step part of the exact prefix: the answer is then
    retraining's bit for bit (momentum buffer included), at retraining's cost plus the removed
    samples' gradients the pairs take."""
    data, forget, (model, store), _, retrained = runs
    steps = len(store.steps)
    got, report = unlearned(model, data, store, forget, burn_in=steps)
    assert report.status == "unlearned" and report.details["prefix_steps"] == steps
    assert torch.equal(flat(got, data), flat(retrained, data))
    prefix, _ = replay_spend(store, forget, steps, steps, stop_spends=False)
    check = len(data) - len(forget)
    assert report.sample_gradients == report.retrain_sample_gradients + prefix + check
