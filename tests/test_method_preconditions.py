"""What the methods refuse, and state that belongs to its history: each case was once answered with
a wrong result and no error (the history methods replaying SGD with maximize=True, two learning
rates, a partial optimizer; ledgers reopened on another history or learning rate; Mini dividing by
zero with every id forgotten; Random-k answering with NaN weights; a failed request advancing the
perturbation's request counter)."""
import copy

import pytest
import torch

import unlearn_ext as ue
from unlearn_ext.ledger import DeletionLedger
from unlearn_ext.mini.vectors import FlatModel
from unlearn_ext.pcmu import PCMUTrainer, PCMUUnlearner

from history_methods_setup import classification
from ledger_methods_setup import Setting, same


def recorded(opt_factory, *, record_steps=3):
    """A HistoryRecorder'd torch.optim loop (a few steps) and the store, for DeltaGrad and Mini."""
    data, model = classification()
    opt = opt_factory(model)
    store = ue.step_store(model, params="fp32", grads="fp32")
    recorder = ue.HistoryRecorder(store, model, opt, steps_per_epoch=4, batch_seed=0, n=len(data))
    schedule = ue.BatchSchedule(data.ids, 16, 0)
    for step in schedule.steps(0, record_steps):
        opt.zero_grad()
        x, y = data.batch(step.ids)
        data.loss(model(x), y).mean().backward()
        recorder.batch(step.ids)
        opt.step()
    return data, model, store


@pytest.mark.parametrize("opt_factory, match", [
    (lambda m: torch.optim.SGD(m.parameters(), lr=0.1, maximize=True), "maximize=True"),
    (lambda m: torch.optim.SGD([{"params": [m.weight], "lr": 0.1}, {"params": [m.bias], "lr": 0.01}]),
     r"different lr \(\[0.1, 0.01\]\)"),
    (lambda m: torch.optim.SGD([m.weight], lr=0.1), r"updated only some.*positions \[1\]"),
])
def test_deltagrad_refuses_what_it_cannot_replay(opt_factory, match):
    data, model, store = recorded(opt_factory)
    with pytest.raises(ue.UnsupportedOptimizerError, match=match):
        ue.DeltaGradUnlearner(model, data, store)


def test_a_scheduler_that_moves_one_group_is_refused():
    def factory(m):
        return torch.optim.SGD([{"params": [m.weight]}, {"params": [m.bias]}], lr=0.1)
    data, model = classification()
    opt = factory(model)
    store = ue.step_store(model, params="fp32", grads="fp32")
    recorder = ue.HistoryRecorder(store, model, opt, steps_per_epoch=4, batch_seed=0, n=len(data))
    for t, step in enumerate(ue.BatchSchedule(data.ids, 16, 0).steps(0, 3)):
        opt.param_groups[1]["lr"] = 0.1 if t < 2 else 0.05
        opt.zero_grad()
        x, y = data.batch(step.ids)
        data.loss(model(x), y).mean().backward()
        recorder.batch(step.ids)
        opt.step()
    with pytest.raises(ue.UnsupportedOptimizerError, match=r"at step 2 the param groups' learning rates differ"):
        ue.DeltaGradUnlearner(model, data, store)


def test_batch_norm_in_training_mode_is_refused_with_what_to_do():
    data, _ = classification()
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 3))
    for make, who in ((lambda: ue.step_store(model, params="fp32", grads="fp32"), "DeltaGrad"),
                      (lambda: ue.mini_store(model), "Mini-Unlearning")):
        store = make()
        cls = ue.DeltaGradUnlearner if who == "DeltaGrad" else ue.MiniUnlearner
        store.set_run_info(optimizer="SGD", weight_decay=0.0, lr_schedule=[0.1], steps_per_epoch=1, n=len(data))
        with pytest.raises(ValueError, match=f"{who}: BatchNorm in training mode.*GroupNorm.*eval mode.*convert"):
            cls(model, data, store)


def test_mini_forgetting_every_sample_gives_the_initial_weights():
    s = Setting("mini")
    mini = s.unlearner()
    trained = mini.flat.flat()
    report = mini.unlearn(s.data.ids)
    assert report.status == "retrained" and "every training sample is forgotten" in report.reason
    # Retraining without any sample makes no update: the stored initial weights.
    w0 = mini.flat.join(s.store.read(0, ["params"]).tensors["params"])
    assert torch.equal(mini.flat.flat(), w0) and not torch.equal(w0, trained)


def test_deltagrad_falls_back_when_its_answer_raises_the_retained_loss(monkeypatch):
    """The check against an answer worse than doing nothing: a replay that lands far off (here
    forced) raises the retained loss, and the request falls back to retraining from the stored
    initial weights."""
    s = Setting("deltagrad")
    u = s.unlearner()
    union = torch.tensor([3, 4])
    initial = copy.deepcopy(s.trained)
    FlatModel(initial, s.data).load_(u.flat.join(s.store.read(0, ["params"]).tensors["params"]))
    exact = FlatModel(ue.retrain(initial, s.data, s.config, union), s.data).flat()
    real_replay = u._replay

    def far_off(plan, run):  # run: the retained run the replay's exact prefix takes its steps on
        w, cost, stats, reason = real_replay(plan, run)
        return w + 5.0, cost, stats, reason

    monkeypatch.setattr(u, "_replay", far_off)
    report = u.unlearn([3, 4])
    assert report.status == "fallback" and "the retained loss" in report.reason
    assert report.details["retained_loss_rise"] > u.loss_rise_limit
    assert torch.equal(u.flat.flat(), exact)


@pytest.mark.parametrize("method", ["mini", "deltagrad"])
def test_a_ledger_of_another_history_is_refused(method, tmp_path):
    """Same data and shapes, another initial model and learning rate: the ledger's state was computed
    from another run and must not be continued on this one."""
    a = Setting(method)
    with DeletionLedger(a.unlearner(), str(tmp_path)) as ledger:
        ledger.forget([3, 4])
    b = Setting.__new__(Setting)
    b.method, b.loss = method, a.loss
    b.data, b.config = a.data, ue.SGDConfig(epochs=4, batch_size=16, lr=0.2, weight_decay=1e-3)
    torch.manual_seed(1)
    model = copy.deepcopy(a.trained)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    if method == "mini":
        b.store = ue.mini_store(model)
        ue.train_recording_anchors(model, b.data, b.config, b.store, anchors=2)
    else:
        b.store = ue.step_store(model, params="fp32", grads="fp32")
        ue.train_recording_steps(model, b.data, b.config, b.store)
    b.trained = model
    with pytest.raises(ValueError, match="another model or configuration.*history_sha256"):
        DeletionLedger(b.unlearner(), str(tmp_path))


def test_a_pcmu_ledger_trained_with_another_lr_is_refused(tmp_path):
    s = Setting("pcmu")
    with DeletionLedger(s.unlearner(), str(tmp_path)) as ledger:
        ledger.forget([3, 4])
    other = PCMUTrainer(copy.deepcopy(s.trained), None, s.data, batch_size=16, clip_norm=1.0, lr=0.05, tau=0.01,
                        sigma=0.01, max_request=2)
    with pytest.raises(ValueError, match="another learning rate.*lr"):
        DeletionLedger(PCMUUnlearner(other), str(tmp_path))


@pytest.mark.parametrize("method", ["randomk", "topk"])
def test_non_finite_results_are_refused_and_nothing_changes(method):
    """NaN gradients in the repair (a loss that turns NaN): refused, weights, buffers, forgotten ids
    and the request counter as before; the next request draws what it would have drawn."""
    s = Setting(method)
    u, clean = s.unlearner(), s.unlearner()
    before = u.state_dict()
    real_loss = s.data.loss
    s.data.loss = lambda out, y: real_loss(out, y) * float("nan")
    try:
        with pytest.raises(FloatingPointError, match="non-finite"):
            u.unlearn([3, 4])
    finally:
        s.data.loss = real_loss
    assert same(u.state_dict(), before) and u.requests == 0
    u.unlearn([3, 4])
    clean.unlearn([3, 4])
    assert same(u.state_dict(), clean.state_dict())


def test_random_k_refuses_non_finite_parameters():
    s = Setting("randomk")
    u = s.unlearner()
    with torch.no_grad():
        next(u.model.parameters())[0, 0] = float("inf")
    before = u.state_dict()
    with pytest.raises(FloatingPointError, match="parameters before the request.*non-finite"):
        u.unlearn([3, 4])
    assert same(u.state_dict(), before)
