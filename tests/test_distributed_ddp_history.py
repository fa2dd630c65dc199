"""History recording under DistributedDataParallel (unlearn_ext.distributed.ddp through
UnlearningEngine.make_unlearnable), 2 and 3 gloo ranks: a DDP-wrapped model in the user's own loop,
each rank loading its share of every scheduled batch. Rank 0's history read back (steps, lrs, batch
ids, weights, gradients, Mini-Unlearning's full-data gradients) equals a single-process recording
of the same loop on the same batches within float tolerance (DDP averages the ranks' float32 mean
gradients); the other ranks record nothing and refuse to answer requests; rank 0's answer to a
request equals the single-process answer. Set-ups DDP cannot serve are refused on every rank
before training."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import unlearn_ext as ue
from unlearn_ext.mini.vectors import FlatModel

from distributed_setup import launch

TIMEOUT_S = 120
N, BATCH, EPOCHS = 240, 48, 3        # batches of 48 split into 2 x 24 and 3 x 16
FORGET = [3, 17, 42, 200]
METHODS = ("mini", "deltagrad")


def _dataset():
    g = torch.Generator().manual_seed(5)
    y = torch.randint(0, 3, (N,), generator=g)
    x = torch.randn(N, 6, generator=g) + nn.functional.one_hot(y, 6).float()
    return torch.utils.data.TensorDataset(x, y)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _train(method: str, wrap) -> tuple:
    """The user's loop; wrap(model) -> the module the loop trains (a DDP wrapper or the model)."""
    model = _model()
    trained = wrap(model)
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.2, weight_decay=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    loader = torch.utils.data.DataLoader(_dataset(), batch_size=BATCH, shuffle=True)
    store = ue.mini_store(model) if method == "mini" else ue.step_store(model, params="fp32", grads="fp32")
    engine = ue.UnlearningEngine()
    trained, optimizer, loader = engine.make_unlearnable(trained, optimizer, loader, method=method, epochs=EPOCHS,
                                                         loss_fn=loss_fn, history=store, anchors=2)
    seen = 0
    for _ in range(EPOCHS):
        for x, y in loader:
            seen += len(y)
            optimizer.zero_grad()
            loss_fn(trained(x), y).backward()
            optimizer.step()
    return engine, model, store, seen


def _history(store) -> list:
    return [(s.step, s.lrs, s.batch_ids, s.tensors) for s in store.iter()]


def _answer(engine, model) -> dict:
    report = engine.unlearner().unlearn(FORGET)
    return {"status": report.status, "weights": FlatModel(model, engine.data).flat()}


def _refusal(build) -> str:
    try:
        build()
    except (ValueError, RuntimeError) as exc:
        return str(exc)
    return "accepted"


def ddp_worker(rank, world):
    out = {}
    for method in METHODS:
        engine, model, store, seen = _train(method, DistributedDataParallel)
        if rank == 0:
            out[method] = {"history": _history(store), "answer": _answer(engine, model)}
        else:
            out[method] = {"recorded": len(store.steps), "refusal": _refusal(engine.unlearner)}
        out[method]["seen"] = seen
    ddp = DistributedDataParallel(_model())
    sgd = torch.optim.SGD(ddp.parameters(), lr=0.1)
    out["refusals"] = [
        _refusal(lambda: ue.UnlearningEngine().make_unlearnable(ddp, sgd, _dataset(), method="mini", epochs=1,
                                                                batch_size=49)),
        _refusal(lambda: ue.UnlearningEngine().make_unlearnable(ddp, sgd, _dataset(), method="topk", epochs=1,
                                                                batch_size=BATCH))]
    return out


def _same_history(got: list, want: list) -> None:
    assert [s[0] for s in got] == [s[0] for s in want], "recorded steps differ"
    for (t, lrs, ids, tensors), (_, want_lrs, want_ids, want_tensors) in zip(got, want):
        assert lrs == want_lrs, t
        assert (ids is None) == (want_ids is None) and (ids is None or torch.equal(ids, want_ids)), t
        assert tensors.keys() == want_tensors.keys(), t
        for name in tensors:
            for a, b in zip(tensors[name], want_tensors[name]):
                assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (t, name, float((a - b).abs().max()))


def _compare(world: int):
    got = launch(ddp_worker, world, TIMEOUT_S)
    for method in METHODS:
        engine, model, store, _ = _train(method, lambda m: m)
        want_history, want = _history(store), _answer(engine, model)
        assert len(want_history) > 1
        _same_history(got[0][method]["history"], want_history)
        answer = got[0][method]["answer"]
        assert answer["status"] == want["status"]
        assert torch.allclose(answer["weights"], want["weights"], rtol=1e-4, atol=1e-5)
        assert [got[r][method]["seen"] for r in range(world)] == [N * EPOCHS // world] * world  # a share each
        for rank in range(1, world):
            assert got[rank][method]["recorded"] == 0
            assert "call engine.unlearner() on rank 0" in got[rank][method]["refusal"]
    for rank in range(world):
        uneven, unsupported = got[rank]["refusals"]
        assert "49 samples do not split into" in uneven and f"{world} equal shares" in uneven, uneven
        assert "not for method='topk'" in unsupported, unsupported


@pytest.mark.slow
def test_two_ranks_record_as_one_process():
    _compare(2)


@pytest.mark.slow
def test_three_ranks_record_as_one_process():
    _compare(3)
