"""History recording and unlearning under DistributedDataParallel (unlearn_ext.distributed.ddp
through UnlearningEngine.make_unlearnable), 2 and 3 gloo ranks: a DDP-wrapped model in the user's
own loop, each rank loading its share of every scheduled batch.

Every rank records the same history into its own store (Mini-Unlearning: a disk store at the
user's path made rank-specific, `<path>.rank<r>`; DeltaGrad: the user's in-memory store): the ranks'
histories read back are equal bit for bit, and equal a single-process recording of the same loop on
the same batches within float tolerance (DDP averages the ranks' float32 mean gradients). The same
request on every rank leaves the same weights on every rank, bit for bit, and equal the
single-process engine's answer within the distributed history methods' tolerance. A rank whose
store was tampered with after training makes `engine.unlearner()` refuse on every rank. Set-ups DDP
cannot serve are refused on every rank before training."""
from __future__ import annotations

import os
import tempfile

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import unlearn_ext as ue
from unlearn_ext.distributed.ddp import rank_history_path
from unlearn_ext.mini.vectors import FlatModel

from distributed_setup import launch

TIMEOUT_S = 180
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


def _train(method: str, wrap, directory: str) -> tuple:
    """The user's loop; wrap(model) -> the module the loop trains (a DDP wrapper or the model).
    Mini-Unlearning records into the path `directory/anchors` (the engine makes the store),
    DeltaGrad into an fp32 store the user made."""
    model = _model()
    trained = wrap(model)
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.2, weight_decay=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    loader = torch.utils.data.DataLoader(_dataset(), batch_size=BATCH, shuffle=True)
    history = os.path.join(directory, "anchors") if method == "mini" else \
        ue.step_store(model, params="fp32", grads="fp32")
    engine = ue.UnlearningEngine()
    trained, optimizer, loader = engine.make_unlearnable(trained, optimizer, loader, method=method, epochs=EPOCHS,
                                                         loss_fn=loss_fn, history=history, anchors=2)
    seen = 0
    for _ in range(EPOCHS):
        for x, y in loader:
            seen += len(y)
            optimizer.zero_grad()
            loss_fn(trained(x), y).backward()
            optimizer.step()
    return engine, model, history, seen


def _history(store) -> list:
    return [(s.step, s.lrs, s.batch_ids, s.tensors) for s in store.iter()]


def _read_back(history, path: str) -> list:
    """The recorded history: the user's store, or the disk store the engine made at `path`."""
    if isinstance(history, ue.HistoryStore):
        return _history(history)
    store = ue.HistoryStore.open(path, writable=False)
    try:
        return _history(store)
    finally:
        store.close()


def _answer(engine, model) -> dict:
    report = engine.unlearner().unlearn(FORGET)
    return {"status": report.status, "weights": FlatModel(model, engine.data).flat()}


def _refusal(build) -> str:
    try:
        build()
    except (ValueError, RuntimeError) as exc:
        return str(exc)
    return "accepted"


def ddp_worker(rank, world, directory):
    out = {}
    for method in METHODS:
        engine, model, history, seen = _train(method, DistributedDataParallel, directory)
        answer = _answer(engine, model)
        path = rank_history_path(os.path.join(directory, "anchors"), rank)
        out[method] = {"history": _read_back(history, path), "answer": answer, "seen": seen}
    # Tampered: rank 1's store gains run metadata the other ranks' stores lack after training.
    with tempfile.TemporaryDirectory() as own:  # a fresh path: the first run's files stay
        for method in METHODS:
            engine, _, _, _ = _train(method, DistributedDataParallel, own)
            if rank == 1:
                engine.run.recorder.store.set_run_info(tampered=True)
            out[method]["tampered"] = _refusal(engine.unlearner)
    ddp = DistributedDataParallel(_model())
    sgd = torch.optim.SGD(ddp.parameters(), lr=0.1)
    out["refusals"] = [
        _refusal(lambda: ue.UnlearningEngine().make_unlearnable(ddp, sgd, _dataset(), method="mini", epochs=1,
                                                                batch_size=49)),
        _refusal(lambda: ue.UnlearningEngine().make_unlearnable(ddp, sgd, _dataset(), method="topk", epochs=1,
                                                                batch_size=BATCH))]
    return out


def _same_history(got: list, want: list, exact: bool) -> None:
    assert [s[0] for s in got] == [s[0] for s in want], "recorded steps differ"
    for (t, lrs, ids, tensors), (_, want_lrs, want_ids, want_tensors) in zip(got, want):
        assert lrs == want_lrs, t
        assert (ids is None) == (want_ids is None) and (ids is None or torch.equal(ids, want_ids)), t
        assert tensors.keys() == want_tensors.keys(), t
        for name in tensors:
            for a, b in zip(tensors[name], want_tensors[name]):
                if exact:
                    assert torch.equal(a, b), (t, name)
                else:
                    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (t, name, float((a - b).abs().max()))


def _compare(world: int):
    with tempfile.TemporaryDirectory() as directory:
        got = launch(ddp_worker, world, TIMEOUT_S, directory)
        written = sorted(os.listdir(directory))
    assert written == [f"anchors.rank{r}" for r in range(world)]  # one file per rank at the user's path
    for method in METHODS:
        with tempfile.TemporaryDirectory() as directory:
            engine, model, history, _ = _train(method, lambda m: m, directory)
            want = _answer(engine, model)
            want_history = _read_back(history, os.path.join(directory, "anchors"))
        assert len(want_history) > 1
        assert want["status"] == "unlearned", want  # the approximate path runs, not the fallback
        for rank in range(world):
            outcome = got[rank][method]
            _same_history(outcome["history"], got[0][method]["history"], exact=True)
            _same_history(outcome["history"], want_history, exact=False)
            assert torch.equal(outcome["answer"]["weights"], got[0][method]["answer"]["weights"]), \
                f"{method}: rank {rank} ended with other weights than rank 0"
            assert outcome["answer"]["status"] == want["status"]
            weights = outcome["answer"]["weights"]
            assert torch.allclose(weights, want["weights"], rtol=1e-4, atol=1e-5), \
                (method, float((weights - want["weights"]).abs().max()))
            assert outcome["seen"] == N * EPOCHS // world  # a share each
            assert "the ranks disagree on history (its sha256)" in outcome["tampered"], outcome["tampered"]
        # the request moved the weights (the comparison above is not between two unchanged models)
        assert not torch.equal(want["weights"], FlatModel(engine.trained, engine.data).flat())
    for rank in range(world):
        uneven, unsupported = got[rank]["refusals"]
        assert "49 samples do not split into" in uneven and f"{world} equal shares" in uneven, uneven
        assert "not for method='topk'" in unsupported, unsupported


@pytest.mark.slow
def test_two_ranks_record_and_unlearn_as_one_process():
    _compare(2)


@pytest.mark.slow
def test_three_ranks_record_and_unlearn_as_one_process():
    _compare(3)
