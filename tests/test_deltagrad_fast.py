"""DeltaGrad's fast replay (one working copy of the model per request, the schedule read once, an
exact step's two gradients from one forward pass) against the straightforward per-step replay of
tests/deltagrad_reference.py, and its fallback against retraining bit for bit."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import unlearn_ext as ue
from unlearn_ext.mini.replay_model import ReplayModel
from unlearn_ext.mini.vectors import FlatModel

from deltagrad_reference import straightforward_replay
from history_methods_setup import classification, flat

FORGET = torch.tensor([1, 5, 7, 20, 33])


def blobs(n=80, d=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, d, generator=g) + 1.5 * nn.functional.one_hot(y, d).float()
    return ue.TrainingData(x, y)


def eval_batch_norm_mlp(d=6, classes=3, seed=0):
    """Linear -> BatchNorm1d (eval mode, non-trivial running statistics and affine) -> Tanh -> Linear."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, classes))
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    bn.eval()
    return model


def recorded(data, init, config, **store_kw):
    model = copy.deepcopy(init)
    store = ue.step_store(model, **store_kw)
    ue.train_recording_steps(model, data, config, store)
    return model, store


def fast_and_reference(model, data, store, **kw):
    unlearner = ue.DeltaGradUnlearner(copy.deepcopy(model), data, store, **kw)
    return unlearner._replay(unlearner._plan(FORGET)), straightforward_replay(unlearner, FORGET)


def assert_same_replay(fast, ref):
    (w, cost, stats, reason), (w_ref, cost_ref, stats_ref, reason_ref) = fast, ref
    assert reason == reason_ref == ""
    assert cost == cost_ref
    assert stats["exact_steps"] == stats_ref["exact_steps"]
    assert stats["worst_prediction_error"] == pytest.approx(stats_ref["worst_prediction_error"], rel=1e-3)
    assert stats["max_eta_lambda"] == pytest.approx(stats_ref["max_eta_lambda"], rel=1e-3)
    assert torch.allclose(w, w_ref, atol=1e-5, rtol=1e-5), float((w - w_ref).abs().max())


@pytest.mark.parametrize("codec", ["fp32", "int8"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_fast_replay_equals_step_by_step_replay(codec, momentum):
    data, init = classification()
    lr = 0.5 if not momentum else 0.05
    config = ue.SGDConfig(epochs=10, batch_size=16, lr=lambda t: lr / (1 + 0.02 * t), weight_decay=1e-3,
                          momentum=momentum)
    model, store = recorded(data, init, config, params=codec, grads=codec)
    fast, ref = fast_and_reference(model, data, store, burn_in=5, period=4, memory=2)
    assert fast[2]["exact_steps"] < len(store.steps) / 2  # quasi-Newton steps were replayed
    assert_same_replay(fast, ref)


def test_fast_replay_with_eval_mode_batch_norm():
    """Buffers (BatchNorm's running statistics, in eval mode) enter every gradient of the working copy as
    they enter FlatModel's; the user's model keeps its mode and gets no .grad."""
    data, init = blobs(), eval_batch_norm_mlp()
    config = ue.SGDConfig(epochs=8, batch_size=16, lr=0.2, weight_decay=1e-3)
    model, store = recorded(data, init, config, params="fp32", grads="fp32")
    assert not model[1].training and model.training  # BatchNorm in eval mode, the rest in training mode
    fm = FlatModel(model, data)
    w = fm.flat()
    ids = data.ids[:23]
    assert torch.allclose(ReplayModel(fm).mean_loss_grad(w + 0.01, ids), fm.mean_loss_grad(w + 0.01, ids),
                          atol=1e-7, rtol=1e-6)
    # the working copy above was built on `model` itself: its weights, modes and .grad are untouched
    assert torch.equal(fm.flat(), w)
    assert model.training and not model[1].training
    assert all(p.grad is None for p in model.parameters())
    fast, ref = fast_and_reference(model, data, store, burn_in=4, period=3)
    assert_same_replay(fast, ref)


def relu_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 3))


@pytest.mark.parametrize("codec", ["fp32", "int8"])
def test_fallback_gives_retraining_bit_for_bit(codec):
    """A fallback must be retraining, not a replay of its arithmetic on flat vectors: rounding that
    differs in the last bit grows over the steps of a ReLU network (the flat-vector replay measured
    d/d0 0.11 after 115 steps of the harness's CNN, from an exact fp32 step 0 as from int8)."""
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 3, (96,), generator=g)
    x = torch.randn(96, 1, 8, 8, generator=g) + y.view(-1, 1, 1, 1).float()
    data, init = ue.TrainingData(x, y), relu_cnn()
    config = ue.SGDConfig(epochs=6, batch_size=16, lr=0.1, weight_decay=1e-4)
    model, store = recorded(data, init, config, params=codec, grads=codec)
    got = copy.deepcopy(model)
    report = ue.DeltaGradUnlearner(got, data, store, max_prediction_error=0.0).unlearn(FORGET)
    assert report.status == "fallback" and "equals retraining" in report.reason
    assert torch.equal(flat(got, data), flat(ue.retrain(init, data, config, FORGET), data))
    assert report.sample_gradients >= report.retrain_sample_gradients


@pytest.mark.parametrize("codec", ["fp32", "int8"])
def test_minis_fallback_gives_retraining_bit_for_bit(codec):
    """Mini-Unlearning's fallback (here forced by a retained-loss limit no answer can meet) resumes
    from the stored initial weights through retraining's own step function: on the same ReLU
    network the result is retraining's, bit for bit, whatever codec stored the anchors."""
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 3, (96,), generator=g)
    x = torch.randn(96, 1, 8, 8, generator=g) + y.view(-1, 1, 1, 1).float()
    data, init = ue.TrainingData(x, y), relu_cnn()
    config = ue.SGDConfig(epochs=6, batch_size=16, lr=0.1, weight_decay=1e-4)
    model, store = copy.deepcopy(init), ue.mini_store(init, codec)
    ue.train_recording_anchors(model, data, config, store, anchors=3)
    got = copy.deepcopy(model)
    report = ue.MiniUnlearner(got, data, store, lanczos_steps=4, loss_rise_limit=-1.0).unlearn(FORGET)
    assert report.status == "fallback", report.reason
    assert torch.equal(flat(got, data), flat(ue.retrain(init, data, config, FORGET), data))


def test_a_request_plans_its_replay_once():
    """The schedule and membership test of a request (_plan) are made once and shared by the
    retained run and the replay."""
    data, init = blobs(), eval_batch_norm_mlp()
    config = ue.SGDConfig(epochs=4, batch_size=16, lr=0.2)
    model, store = recorded(data, init, config, params="fp32", grads="fp32")
    unlearner = ue.DeltaGradUnlearner(copy.deepcopy(model), data, store, burn_in=4, period=3)
    plan, calls = unlearner._plan, []
    unlearner._plan = lambda union: calls.append(union) or plan(union)
    report = unlearner.unlearn(FORGET)
    assert report.status in ("unlearned", "fallback") and len(calls) == 1


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_the_read_ahead_block_size_changes_no_bit(monkeypatch, momentum):
    """The recorded weights and gradients read ahead in blocks (DeltaGradUnlearner._recorded): one
    step per block, blocks that end inside the exact prefix and the default give the same bits,
    with plain SGD and with momentum (whose buffer takes the recorded gradient too)."""
    from unlearn_ext.mini import deltagrad
    data, init = classification(n=90, d=5, classes=3, seed=4)
    config = ue.SGDConfig(epochs=4, batch_size=16, lr=0.2, weight_decay=1e-3, momentum=momentum)
    model, store = recorded(data, init, config)
    answers = []
    for steps in (1, 7, deltagrad.READ_AHEAD_STEPS):
        monkeypatch.setattr(deltagrad, "READ_AHEAD_STEPS", steps)
        unlearner = ue.DeltaGradUnlearner(copy.deepcopy(model), data, store)
        w, _, _, reason = unlearner._replay(unlearner._plan(FORGET))
        assert reason == ""
        answers.append(w)
    assert all(torch.equal(a, answers[0]) for a in answers[1:])


@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_the_decoded_gradients_axpy_rounds_as_the_axpy_on_the_codes(codec):
    """y += alpha g_t from the decoded values (the replay's read-ahead) equals the dequantize-axpy on
    the codes bit for bit, over alphas of either sign and magnitude."""
    from unlearn_ext.mini.deltagrad import _add_scaled_
    from unlearn_ext.history import HistoryStore
    g = torch.Generator().manual_seed(3)
    store = HistoryStore({"grads": {"shapes": [(37, 11), (11,)], "codec": codec}})
    store.record(0, {"grads": [torch.randn(37, 11, generator=g), torch.randn(11, generator=g) * 1e-3]})
    values = store.read_flat(0, "grads")
    for alpha in (-1.0, 0.3, -0.0123456789, 7.77e-5, 3.0):
        y = torch.randn(values.numel(), generator=g)
        want = y.clone()
        store.encoded(0, "grads").axpy_([want[:407].view(37, 11), want[407:]], alpha)
        _add_scaled_(values, y, alpha)
        assert torch.equal(y, want), alpha


def test_the_read_ahead_blocks_hold_no_more_decoded_rows_than_the_bound(monkeypatch):
    """With READ_AHEAD_BYTES small enough to bind, every block the replay reads has at most
    read_ahead_block(dim) steps, and that many steps' rows held at once (READ_AHEAD_ROWS_PER_STEP:
    the block being replayed, the next one, read_flat_many's scratch) fit in the bound; the answer
    is the one of the unbounded read-ahead."""
    from unlearn_ext.mini import deltagrad
    data, init = classification(n=90, d=5, classes=3, seed=4)
    config = ue.SGDConfig(epochs=4, batch_size=16, lr=0.2)
    model, store = recorded(data, init, config)
    unbounded = ue.DeltaGradUnlearner(copy.deepcopy(model), data, store)
    want, _, _, reason = unbounded._replay(unbounded._plan(FORGET))
    assert reason == ""
    dim = unbounded.flat.dim
    monkeypatch.setattr(deltagrad, "READ_AHEAD_BYTES", 4 * deltagrad.READ_AHEAD_ROWS_PER_STEP * dim * 3 + 5)
    block = deltagrad.read_ahead_block(dim)
    assert block == 3
    unlearner = ue.DeltaGradUnlearner(copy.deepcopy(model), data, store)
    calls, read = [], store.read_flat_many
    monkeypatch.setattr(store, "read_flat_many", lambda steps, name: calls.append(len(steps)) or read(steps, name))
    w, _, _, reason = unlearner._replay(unlearner._plan(FORGET))
    assert reason == "" and torch.equal(w, want)
    assert calls and max(calls) == block
    held = 4 * deltagrad.READ_AHEAD_ROWS_PER_STEP * dim * max(calls)
    assert held <= deltagrad.READ_AHEAD_BYTES


@pytest.mark.parametrize("momentum, nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_runs_of_quasi_newton_steps_in_one_op_give_the_per_step_replays_bits(monkeypatch, momentum, nesterov):
    """The quasi-Newton steps between two exact steps in one ops.deltagrad_qn_run_ call (a tanh MLP:
    a chain the op covers) against the same replay one step at a time (ReplayModel.run_arguments
    None): the same weights bit for bit, the same cost and statistics, with plain SGD, heavy ball
    and Nesterov momentum."""
    data = blobs(n=90, seed=2)
    torch.manual_seed(0)
    init = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    config = ue.SGDConfig(epochs=5, batch_size=16, lr=0.3 if not momentum else 0.05, weight_decay=1e-3,
                          momentum=momentum, nesterov=nesterov)
    model, store = recorded(data, init, config)
    runs = []
    run_op = ue.ops.deltagrad_qn_run_
    monkeypatch.setattr(ue.ops, "deltagrad_qn_run_", lambda *args: runs.append(len(args[8])) or run_op(*args))
    unlearner = ue.DeltaGradUnlearner(copy.deepcopy(model), data, store, burn_in=4, period=4)
    w, cost, stats, reason = unlearner._replay(unlearner._plan(FORGET))
    assert reason == "" and runs and sum(runs) == len(store.steps) - stats["exact_steps"]  # every step in a run
    monkeypatch.setattr(ReplayModel, "run_arguments", lambda self: None)
    w_step, cost_step, stats_step, reason_step = unlearner._replay(unlearner._plan(FORGET))
    assert reason_step == "" and torch.equal(w, w_step)
    assert cost == cost_step and stats == stats_step


def test_a_quasi_newton_run_holds_no_more_decoded_rows_than_the_read_ahead_bound(monkeypatch):
    """A run of quasi-Newton steps in one op call holds its steps' recorded weights and gradients
    (rows of the read-ahead's blocks) until the call: with a period far longer than a read-ahead
    block, the blocks its arguments keep alive still fit in READ_AHEAD_BYTES, and the answer is the
    unbounded read-ahead's."""
    from unlearn_ext.mini import deltagrad
    data = blobs(n=90, seed=2)
    torch.manual_seed(0)
    init = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    model, store = recorded(data, init, ue.SGDConfig(epochs=5, batch_size=16, lr=0.3, weight_decay=1e-3))
    unbounded = ue.DeltaGradUnlearner(copy.deepcopy(model), data, store, burn_in=4, period=20)
    want, _, _, reason = unbounded._replay(unbounded._plan(FORGET))
    assert reason == ""
    dim = unbounded.flat.dim
    monkeypatch.setattr(deltagrad, "READ_AHEAD_BYTES", 4 * deltagrad.READ_AHEAD_ROWS_PER_STEP * dim * 3 + 5)
    assert deltagrad.read_ahead_block(dim) == 3
    held, run_op = [], ue.ops.deltagrad_qn_run_

    def spy(*args):
        # the decoded matrices the run's recorded rows keep alive (one storage per block and field)
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in args[4] + args[5]}
        held.append(sum(storages.values()))
        return run_op(*args)

    monkeypatch.setattr(ue.ops, "deltagrad_qn_run_", spy)
    unlearner = ue.DeltaGradUnlearner(copy.deepcopy(model), data, store, burn_in=4, period=20)
    w, _, _, reason = unlearner._replay(unlearner._plan(FORGET))
    assert reason == "" and torch.equal(w, want)
    assert held and max(held) <= deltagrad.READ_AHEAD_BYTES


@pytest.mark.parametrize("bad_step", [2, 12])  # exact steps: one in the burn-in, one in the approximate phase
def test_a_non_finite_recorded_gradient_at_an_exact_step_stops_the_replay(monkeypatch, bad_step):
    """A non-finite value in an exact step's recorded gradient made the prediction error NaN, which
    `err > limit` never flags, and the pair test skipped it: the replay answered as if nothing were
    wrong. It stops there, naming the step, so the request falls back."""
    from unlearn_ext.mini.deltagrad import DeltaGradUnlearner
    data = blobs(n=90, seed=2)
    torch.manual_seed(0)
    init = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    model, store = recorded(data, init, ue.SGDConfig(epochs=5, batch_size=16, lr=0.3))
    unlearner = ue.DeltaGradUnlearner(copy.deepcopy(model), data, store, burn_in=4, period=4)
    plan = unlearner._plan(FORGET)
    assert all(kept.numel() for _, _, kept, _, _ in plan)  # so the k-th read is step k's
    assert unlearner._exact_step(bad_step)
    read = DeltaGradUnlearner._recorded

    def damaged(self, steps):
        for k, (w_t, add_g) in enumerate(read(self, steps)):
            if k == bad_step:
                add_g.values = add_g.values.clone()
                add_g.values[3] = float("inf")
            yield w_t, add_g

    monkeypatch.setattr(DeltaGradUnlearner, "_recorded", damaged)
    w, _, _, reason = unlearner._replay(plan)
    assert w is None and f"exact step {bad_step} are not finite" in reason
