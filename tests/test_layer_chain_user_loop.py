"""DeltaGrad's Linear-chain gradient (mini/layer_chain.py) on a run wrapped from the user's own loop:
their map-style Dataset and DataLoader(shuffle=True), their nn.CrossEntropyLoss() (mean reduction,
made per-sample by the engine), a model led by nn.Flatten(), SGD plain and with momentum.

What is checked against what:
  * the chain is taken during the request (its calls counted), and the request's answer equals the
    same request on the same trained run with the chain forced off (autograd) to float tolerance;
    both are judged against the library's retraining of the recipe (d/d0 < 1);
  * losses, models and rows the chain does not state keep autograd, and the working copy's
    gradient is then FlatModel's (autograd through functional_call);
  * a request failing inside a replay gradient leaves the unlearner's state as it was, and the
    retry equals the uninterrupted request bit for bit.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import unlearn_ext as ue
from unlearn_ext.data import retrain
from unlearn_ext.mini.layer_chain import LayerChain
from unlearn_ext.mini.replay_model import ReplayModel
from unlearn_ext.mini.vectors import FlatModel
from unlearn_ext.policy import per_sample_loss_of
from user_models import LazyImages, Pairs, distance_ratio, flat, same_state, user_loop

N, BATCH, EPOCHS = 160, 16, 4
FORGET = list(range(3, N, 16))  # 10 of 160 ids


def flatten_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 3))


def users_run(momentum: float = 0.9, loss_fn=None, make_model=flatten_mlp):
    """The user's objects and loop, unchanged but for the one wrapping call."""
    torch.manual_seed(0)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum, weight_decay=1e-3)
    loader = torch.utils.data.DataLoader(LazyImages(N), batch_size=BATCH, shuffle=True)
    loss_fn = nn.CrossEntropyLoss() if loss_fn is None else loss_fn
    engine = ue.UnlearningEngine()
    model, optimizer, loader = engine.make_unlearnable(model, optimizer, loader, method="deltagrad", epochs=EPOCHS,
                                                       loss_fn=loss_fn, seed=3)
    user_loop(model, optimizer, loader, loss_fn, EPOCHS)
    return engine, model


def count_chain_calls(monkeypatch, fail_at: int | None = None) -> list:
    """Counts LayerChain.loss_grad_sums calls (the list's length); raises at call `fail_at`."""
    calls, original = [], LayerChain.loss_grad_sums

    def counted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == fail_at:
            raise RuntimeError(f"injected failure in replay gradient call {fail_at}")
        return original(self, *args, **kwargs)
    monkeypatch.setattr(LayerChain, "loss_grad_sums", counted)
    return calls


def chain_off(monkeypatch) -> None:
    monkeypatch.setattr(LayerChain, "of", classmethod(lambda cls, *args: None))


@pytest.mark.parametrize("loss", ["module", "functional"])
@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["plain", "momentum"])
def test_users_run_takes_the_chain_and_answers_as_autograd(momentum, loss, monkeypatch):
    engine, model = users_run(momentum, None if loss == "module" else nn.functional.cross_entropy)
    assert ReplayModel(FlatModel(model, engine.data)).chain is not None
    unlearner = engine.unlearner()
    before = unlearner.state_dict()
    original = flat(model)

    calls = count_chain_calls(monkeypatch)
    fast_report = unlearner.unlearn(FORGET)
    fast = flat(model)
    taken = len(calls)
    assert taken > 0
    unlearner.load_state_dict(before)
    chain_off(monkeypatch)
    slow_report = unlearner.unlearn(FORGET)
    slow = flat(model)
    assert len(calls) == taken  # the chain was off

    assert fast_report.status == slow_report.status == "unlearned", (fast_report.reason, slow_report.reason)
    assert fast_report.sample_gradients == slow_report.sample_gradients
    # the two differ by float rounding only: far below the request's own change of the weights
    assert float((fast - slow).norm()) <= 1e-4 * float((fast - original).norm())
    assert torch.allclose(fast, slow, atol=1e-6, rtol=1e-5)
    retrained = retrain(engine.initial, engine.data, engine.recipe, FORGET)
    trained = engine.trained
    assert distance_ratio(model, trained, retrained) < 1


def weighted_loss():
    return nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5]))


def hooked_loss():
    loss = nn.CrossEntropyLoss()
    loss.register_forward_hook(lambda module, inputs, output: output * 2)
    return loss


def flatten_in_the_middle():  # Linear over each image row, then Flatten
    return nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Flatten(), nn.Linear(32, 3))


def flatten_other_dims():  # the same function on 1x8x8 images, but not the default dims
    return nn.Sequential(nn.Flatten(start_dim=-3), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 3))


def two_flattens():
    return nn.Sequential(nn.Flatten(), nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 3))


def hooked_model():
    model = flatten_mlp()
    model[2].register_forward_hook(lambda module, inputs, output: output * 0.5)
    return model


def one_hot_images():
    base = LazyImages(N)
    return Pairs(torch.stack([base[i][0] for i in range(N)]),
                 nn.functional.one_hot(torch.tensor([base[i][1] for i in range(N)]), 3).float())


CASES = {  # name: (per-sample loss, model, dataset)
    "label smoothing": (lambda: nn.CrossEntropyLoss(label_smoothing=0.1), flatten_mlp, None),
    "class weights": (weighted_loss, flatten_mlp, None),
    "ignore_index": (lambda: nn.CrossEntropyLoss(ignore_index=1), flatten_mlp, None),
    "loss hook": (hooked_loss, flatten_mlp, None),
    "mse": (nn.MSELoss, flatten_mlp, one_hot_images),
    "user lambda": (lambda: lambda out, y, reduction="mean": nn.functional.cross_entropy(out, y, reduction=reduction),
                    flatten_mlp, None),
    "nll": (nn.NLLLoss, flatten_mlp, None),
    "flatten in the middle": (nn.CrossEntropyLoss, flatten_in_the_middle, None),
    "flatten other dims": (nn.CrossEntropyLoss, flatten_other_dims, None),
    "two flattens": (nn.CrossEntropyLoss, two_flattens, None),
    "model hook": (nn.CrossEntropyLoss, hooked_model, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_what_the_chain_does_not_state_keeps_autograd(case):
    """The engine's per-sample form of the user's loss on their Dataset: no chain, and the working
    copy's gradient is FlatModel's."""
    make_loss, make_model, make_data = CASES[case]
    torch.manual_seed(0)
    data = ue.TrainingData(LazyImages(N) if make_data is None else make_data())
    data.loss = per_sample_loss_of(make_loss())
    fm = FlatModel(make_model(), data)
    assert LayerChain.of(fm.model, [fm.model.get_parameter(n) for n in fm.names], data) is None
    replay = ReplayModel(fm)
    assert replay.chain is None
    w, ids = fm.flat(), data.ids[:24]
    assert torch.allclose(replay.mean_loss_grad(w, ids), fm.mean_loss_grad(w, ids), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", ["label smoothing", "flatten in the middle", "model hook"])
def test_users_run_the_chain_does_not_state_keeps_autograd(case, monkeypatch):
    """Through the engine, the user's loop unchanged: the request never calls the chain."""
    make_loss, make_model, _ = CASES[case]
    engine, model = users_run(0.9, make_loss(), make_model)
    calls = count_chain_calls(monkeypatch)
    report = engine.unlearner().unlearn(FORGET)
    assert report.status == "unlearned", report.reason
    assert not calls


class OddRows(torch.utils.data.Dataset):
    """LazyImages whose item `odd` is not one the chain states: ignore_index's target (-100, whose
    row the default cross-entropy leaves out), a probability target, or float64 pixels."""

    def __init__(self, odd: int, how: str):
        self.base, self.odd, self.how = LazyImages(N), odd, how

    def __len__(self):
        return N

    def __getitem__(self, i):
        x, y = self.base[i]
        if i == self.odd and self.how == "ignored target":
            y = -100
        if self.how == "probability targets":  # every target a probability row (only then do they collate)
            y = nn.functional.one_hot(torch.tensor(y), 3).float()
        return x, y


@pytest.mark.parametrize("how", ["ignored target", "probability targets"])
def test_dataset_rows_are_checked_batch_by_batch(how):
    """A dataset's rows exist only once loaded: a batch the chain does not state goes to autograd
    (and the rest of the request with it); batches before it took the chain. Either way the
    gradient is FlatModel's (autograd's: the ignored row adds nothing)."""
    odd = 17
    data = ue.TrainingData(OddRows(odd, how))
    data.loss = per_sample_loss_of(nn.CrossEntropyLoss())
    torch.manual_seed(0)
    fm = FlatModel(flatten_mlp(), data)
    replay = ReplayModel(fm)
    assert replay.chain is not None
    w = fm.flat()
    plain, with_odd = data.ids[20:40], data.ids[10:30]
    if how == "ignored target":  # batches without the odd row are the chain's
        assert torch.allclose(replay.mean_loss_grad(w, plain), fm.mean_loss_grad(w, plain), atol=1e-6, rtol=1e-5)
        assert replay.chain is not None
    for got, want in zip(replay.split_mean_grads(w, with_odd, plain), (fm.mean_loss_grad(w, with_odd),
                                                                       fm.mean_loss_grad(w, plain))):
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)
    assert replay.chain is None


def test_fits_refuses_rows_it_does_not_state():
    """Each condition of LayerChain.fits on its own (a custom collate_fn can make any of them)."""
    data = ue.TrainingData(LazyImages(N))
    fm = FlatModel(flatten_mlp(), data)
    chain = LayerChain.of(fm.model, [fm.model.get_parameter(n) for n in fm.names], data)
    x, y = data.batch(data.ids[:8])
    assert chain.fits(x, y) and chain.fits(x.reshape(8, 64), y)
    for bad_x, bad_y in [(x.double(), y), (x[:, :, :4], y), (x.reshape(-1), y), (x, y[:7]), (x, y.int()),
                         (x, y.unsqueeze(1)), (x, torch.where(y == 0, 3, y)), (x, y - 1), (x[:0], y[:0]),
                         ([x], y)]:
        assert not chain.fits(bad_x, bad_y)
    assert not chain.rows_checked  # a dataset: every batch is checked (takes)


def test_failed_request_leaves_state_and_retry_is_bit_identical(monkeypatch):
    """An exception in the 5th replay gradient call: the request raises, the model and the forgotten
    ids are as before, and the retry equals the uninterrupted request bit for bit."""
    engine, model = users_run(0.9)
    unlearner = engine.unlearner()
    before = unlearner.state_dict()
    calls = count_chain_calls(monkeypatch)
    uninterrupted_report = unlearner.unlearn(FORGET)
    assert uninterrupted_report.status == "unlearned" and len(calls) > 5
    uninterrupted = unlearner.state_dict()
    unlearner.load_state_dict(before)
    snapshot = [p.detach().clone() for p in model.parameters()]

    monkeypatch.undo()
    count_chain_calls(monkeypatch, fail_at=5)
    with pytest.raises(RuntimeError, match="injected failure in replay gradient call 5"):
        unlearner.unlearn(FORGET)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), snapshot))
    assert unlearner.forgotten.numel() == 0
    monkeypatch.undo()

    retry_report = unlearner.unlearn(FORGET)
    after = unlearner.state_dict()
    assert torch.equal(after["forgotten"], uninterrupted["forgotten"])
    assert all(torch.equal(after["params"][k], uninterrupted["params"][k]) for k in uninterrupted["params"])
    assert retry_report.sample_gradients == uninterrupted_report.sample_gradients
    trained_model = engine.trained
    assert not same_state(model, trained_model)  # the request changed the weights
