"""The written-out backward pass of Linear/activation chains (mini/layer_chain.py) against autograd,
the models it must leave to autograd, and the replay's read-ahead of rows and flat decode of
stored weights against the reads they replace."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import unlearn_ext as ue
from unlearn_ext.mini.layer_chain import LayerChain
from unlearn_ext.mini.replay_model import ReplayModel, batch_rows
from unlearn_ext.history import HistoryStore
from unlearn_ext.mini.vectors import CHUNK, FlatModel

from user_models import Pairs


def table(n=300, d=7, classes=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype) + y.unsqueeze(1).to(dtype)
    return ue.TrainingData(x, y)


def models(d=7, classes=4):
    torch.manual_seed(0)
    return {
        "linear": nn.Linear(d, classes),
        "tanh mlp": nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, classes)),
        "deep mixed": nn.Sequential(nn.Linear(d, 12), nn.ReLU(), nn.Linear(12, 9), nn.Sigmoid(),
                                    nn.Linear(9, 8, bias=False), nn.Tanh(), nn.Linear(8, classes)),
        "in-place relu": nn.Sequential(nn.Linear(d, 10), nn.ReLU(inplace=True), nn.Linear(10, classes)),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(models()))
def test_chain_gradient_equals_autograd(name, dtype):
    data, model = table(dtype=dtype), models()[name].to(dtype)
    fm = FlatModel(model, data)
    w = fm.flat() + 0.3 * torch.randn(fm.dim, generator=torch.Generator().manual_seed(1))
    fast = ReplayModel(fm)
    assert fast.chain is not None
    slow = ReplayModel(fm)
    slow.chain = None  # the same working copy on autograd
    kept, removed = data.ids[:37], data.ids[37:45]
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-10)
    for ids in (kept, removed, data.ids[:1]):
        got = fast.mean_loss_grad(w, ids)
        assert got.dtype == torch.float32
        assert torch.allclose(got, fm.mean_loss_grad(w, ids), **tol)
        assert torch.allclose(got, slow.mean_loss_grad(w, ids), **tol)
    for got, want in zip(fast.split_mean_grads(w, kept, removed), slow.split_mean_grads(w, kept, removed)):
        assert torch.allclose(got, want, **tol)
    # rows handed in give what reading them gives
    assert torch.equal(fast.mean_loss_grad(w, removed, data.batch(removed)), fast.mean_loss_grad(w, removed))


def test_chain_gradient_over_several_chunks():
    data = table(n=CHUNK + 50)
    fm = FlatModel(models()["tanh mlp"], data)
    w = fm.flat()
    got = ReplayModel(fm).mean_loss_grad(w, data.ids, data.batch(data.ids))
    assert torch.allclose(got, fm.mean_loss_grad(w, data.ids), atol=1e-6, rtol=1e-5)


def test_the_second_output_vector_comes_with_the_first_split_call():
    """A call without a split fills one vector: the second (a split call's rows [k:]) is allocated
    only by the first split call, and the split then equals the two calls it replaces."""
    data = table()
    fm = FlatModel(models()["deep mixed"], data)
    chain = ReplayModel(fm).chain
    x, y = data.batch(data.ids[:40])
    whole = chain.loss_grad_sums(x, y).clone()
    assert len(chain.outputs) == 1
    first, second = (g.clone() for g in chain.loss_grad_sums(x, y, split=15))
    assert len(chain.outputs) == 2
    tol = dict(atol=1e-5, rtol=1e-5)
    assert torch.allclose(first, chain.loss_grad_sums(x[:15], y[:15]), **tol)
    assert torch.allclose(second, chain.loss_grad_sums(x[15:], y[15:]), **tol)
    assert torch.allclose(first + second, whole, **tol)


class Residual(nn.Sequential):
    def forward(self, x):
        return super().forward(x) + x[:, :4]


def frozen_first_layer():
    model = copy.deepcopy(models()["tanh mlp"])
    model[0].weight.requires_grad_(False)
    return model


def hooked():
    model = copy.deepcopy(models()["tanh mlp"])
    model[1].register_forward_hook(lambda module, inputs, output: output * 2)
    return model


def forward_replaced():
    model = copy.deepcopy(models()["tanh mlp"])
    model[1].forward = torch.relu  # set on the instance: the class's forward no longer runs
    return model


@pytest.mark.parametrize("case", ["subclass", "conv", "batchnorm", "dropout", "gelu", "frozen", "hook",
                                  "instance forward", "global hook", "loss", "float targets", "targets out of range", "input dtype", "3-d inputs"])
def test_models_and_data_left_to_autograd(case, request):
    """Anything the chain does not state exactly keeps autograd (LayerChain.of is None), and the
    working copy's gradient is still FlatModel's."""
    data, model = table(), models()["tanh mlp"]
    x, y = data.inputs, data.targets
    if case == "subclass":
        model = Residual(nn.Linear(7, 16), nn.Tanh(), nn.Linear(16, 4))
    elif case == "conv":
        data, model = ue.TrainingData(x.view(-1, 1, 7), y), nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(10, 4))
    elif case == "batchnorm":
        model = nn.Sequential(nn.Linear(7, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 4))
    elif case == "dropout":
        model = nn.Sequential(nn.Linear(7, 16), nn.Dropout(0.5), nn.Linear(16, 4))
    elif case == "gelu":
        model = nn.Sequential(nn.Linear(7, 16), nn.GELU(), nn.Linear(16, 4))
    elif case == "frozen":
        model = frozen_first_layer()
    elif case == "hook":
        model = hooked()
    elif case == "instance forward":
        model = forward_replaced()
    elif case == "global hook":  # registered for every module, removed at the end of the test
        handle = nn.modules.module.register_module_forward_hook(
            lambda module, inputs, output: output * 2 if isinstance(module, nn.Tanh) else None)
        request.addfinalizer(handle.remove)
    elif case == "loss":
        data = ue.TrainingData(x, y, loss=lambda out, t: nn.functional.cross_entropy(out, t, reduction="none", label_smoothing=0.1))
    elif case == "float targets":
        data = ue.TrainingData(x, nn.functional.one_hot(y, 4).float())
    elif case == "targets out of range":
        data = ue.TrainingData(x, torch.where(y == 0, torch.full_like(y, -100), y))
    elif case == "input dtype":
        data = ue.TrainingData(x.double(), y)
    elif case == "3-d inputs":
        data = ue.TrainingData(x.view(-1, 1, 7), y)
        model = nn.Sequential(nn.Linear(7, 16), nn.Tanh(), nn.Linear(16, 4), nn.Flatten())
    fm = FlatModel(model, data)
    params = [fm.model.get_parameter(n) for n in fm.names]
    assert LayerChain.of(fm.model, params, data) is None
    replay = ReplayModel(fm)
    assert replay.chain is None
    if case in ("input dtype",):
        return  # the model itself cannot run on these inputs
    w, ids = fm.flat(), data.ids[:20]
    assert torch.allclose(replay.mean_loss_grad(w, ids), fm.mean_loss_grad(w, ids), atol=1e-6, rtol=1e-5)



@pytest.mark.parametrize("in_memory", [True, False])
def test_batch_rows_reads_each_set_as_data_batch(in_memory):
    base = table(n=CHUNK + 700)
    data = base if in_memory else ue.TrainingData(Pairs(base.inputs, base.targets))
    g = torch.Generator().manual_seed(2)
    sizes = [5, 130, 2000, 1, 2500, 17, CHUNK + 3, 9]  # blocks break inside, and a set larger than CHUNK
    sets = [data.ids[torch.randperm(len(data), generator=g)[:k]] for k in sizes]
    got = list(batch_rows(data, sets))
    assert len(got) == len(sets)
    for (x, y), ids in zip(got, sets):
        want_x, want_y = data.batch(ids)
        assert torch.equal(x, want_x) and torch.equal(y, want_y)


@pytest.mark.parametrize("codec", ["fp32", "int8", "int4"])
def test_read_flat_equals_the_joined_read(codec):
    data, init = table(), models()["deep mixed"]
    model = copy.deepcopy(init)
    store = ue.step_store(model, params=codec, grads=codec)
    ue.train_recording_steps(model, data, ue.SGDConfig(epochs=2, batch_size=32, lr=0.1), store)
    fm = FlatModel(model, data)
    for step in (0, 3, 1, len(store.steps) - 1, 5):  # out of order: the delta chain's cache moves both ways
        for name in ("params", "grads"):
            assert torch.equal(store.read_flat(step, name), fm.join(store.read(step, [name]).tensors[name]))


def test_read_flat_many_decodes_no_more_rows_at_once_than_it_returns(monkeypatch):
    """Between two far-apart rows of a delta chain, read_flat_many's scratch holds at most as many
    decoded records as it returns rows (so a reader bounding its rows bounds the scratch too), and
    the rows are still those read_flat gives."""
    from unlearn_ext.history import codecs as hc
    data, init = table(), models()["deep mixed"]
    model = copy.deepcopy(init)
    store = ue.step_store(model, params="int8", grads="int8", keyframe_every=1000)
    ue.train_recording_steps(model, data, ue.SGDConfig(epochs=1, batch_size=4, lr=0.05), store)  # 75 steps
    last = len(store.steps) - 1
    want = [store.read_flat(t, "params") for t in (1, last)]
    decoded, decode = [], hc.decode_many_into
    monkeypatch.setattr(hc, "decode_many_into", lambda codes, views, *a: decoded.append(len(views)) or decode(codes, views, *a))
    got = store.read_flat_many([1, last], "params")  # (the weights: a delta chain)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert sum(decoded) == last - 1 and max(decoded) <= 2, decoded


@pytest.mark.parametrize("codec", ["fp32", "int8", "int4"])
@pytest.mark.parametrize("tier", ["host", "disk"])
def test_read_flat_many_equals_read_flat_row_by_row(codec, tier, tmp_path):
    """The replay's read-ahead: every row bit for bit what read_flat gives, over blocks that cross
    keyframes, skip steps (few or many), start at a keyframe or at step 0; the decoder's cache then continues from
    the last row; bad step lists refused with a one-line error."""
    data, init = table(), models()["deep mixed"]
    model = copy.deepcopy(init)
    store = ue.step_store(model, params=codec, grads=codec, keyframe_every=4, tier=tier,
                          path=str(tmp_path / "h.hist") if tier == "disk" else None)
    ue.train_recording_steps(model, data, ue.SGDConfig(epochs=1, batch_size=4, lr=0.05), store)  # 75 steps
    fresh = HistoryStore.open(str(tmp_path / "h.hist"), writable=False) if tier == "disk" else store
    last = len(store.steps) - 1
    want = {name: [fresh.read_flat(t, name) for t in store.steps] for name in ("params", "grads")}
    for steps in ([0], list(range(0, 11)), list(range(3, last + 1, 3)), [4, 5, 9], list(range(last - 6, last + 1)),
                  [1, last]):  # (the last: more records between two rows than one decode call takes)
        for name in ("params", "grads"):
            got = store.read_flat_many(steps, name)
            assert got.shape == (len(steps), FlatModel(model, data).dim)
            for row, t in zip(got, steps):
                assert torch.equal(row, want[name][t]), (codec, name, t)
            if steps[-1] < last:  # the cache left at the last row: the next step reads as from scratch
                assert torch.equal(store.read_flat(steps[-1] + 1, name), want[name][steps[-1] + 1])
    assert store.read_flat_many([], "grads").shape[0] == 0
    with pytest.raises(ValueError, match="steps must increase"):
        store.read_flat_many([3, 3], "params")
    with pytest.raises(KeyError, match="not recorded"):
        store.read_flat_many([1, last + 5], "params")
