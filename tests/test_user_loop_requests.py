"""A request's answer is a function of the trained run and the request, never of the process's
RNG state when it is made, and a request leaves that state alone: a model with dropout trains in
training mode during Mini-Unlearning's / DeltaGrad's exact fallback and during fine-tuning's and
Top-K's repairs, and those draws come from a generator seeded by the run. Before, the fallback drew
from (and moved) the global RNG, so a request made after a restart -- the ledger reopened in a new
process -- gave other weights than the same request in the uninterrupted process."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import unlearn_ext as ue
from user_models import LazyImages, cnn, same_state, user_loop

N, BATCH, EPOCHS = 48, 16, 2
FORGET = [3, 17]
# Options that make Mini-Unlearning take its exact fallback (a retained-loss limit no answer meets).
OPTIONS = {"mini": {"loss_rise_limit": -1.0}, "finetune": {}, "topk": {}}


def trained(method):
    torch.manual_seed(0)
    model = cnn("group", dropout=0.3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = torch.utils.data.DataLoader(LazyImages(N), batch_size=BATCH, shuffle=True)
    engine = ue.UnlearningEngine()
    model, optimizer, loader = engine.make_unlearnable(model, optimizer, loader, method=method, epochs=EPOCHS,
                                                       **OPTIONS[method])
    user_loop(model, optimizer, loader, nn.CrossEntropyLoss(), EPOCHS)
    return engine, model


@pytest.mark.parametrize("method", list(OPTIONS))
def test_a_request_on_a_dropout_model_ignores_and_keeps_the_processs_rng_state(method):
    answers = []
    for process_seed in (1, 2):  # two processes that drew differently before the request
        engine, model = trained(method)
        torch.manual_seed(process_seed)
        before = torch.get_rng_state()
        report = engine.unlearner().unlearn(FORGET)
        assert torch.equal(torch.get_rng_state(), before)
        answers.append((report.status, model))
    assert answers[0][0] == answers[1][0]
    if method == "mini":
        assert answers[0][0] == "fallback"
    assert same_state(answers[0][1], answers[1][1])


@pytest.mark.parametrize("method,store", [("mini", "mini_store"), ("deltagrad", "step_store")])
def test_a_history_path_that_exists_is_refused_before_training_naming_the_fixes(method, store, tmp_path):
    """A process that trains again after a restart passes the same path: removing it or
    overwrite=True are the ways on, and the latter records the run as the first did."""
    path = tmp_path / "history.bin"
    path.write_bytes(b"recorded by an earlier process")
    model = cnn("group")
    loader = torch.utils.data.DataLoader(LazyImages(N), batch_size=BATCH, shuffle=True)
    engine = ue.UnlearningEngine()
    with pytest.raises(FileExistsError, match=f"exists: .*Remove it.*ue.{store}\\(model, tier='disk'.*overwrite=True"):
        engine.make_unlearnable(model, torch.optim.SGD(model.parameters(), lr=0.05), loader, method=method,
                                epochs=EPOCHS, history=path)
    assert engine.run is None
    history = getattr(ue, store)(model, tier="disk", path=path, overwrite=True)
    model, optimizer, loader = engine.make_unlearnable(model, torch.optim.SGD(model.parameters(), lr=0.05), loader,
                                                       method=method, epochs=EPOCHS, history=history)
    user_loop(model, optimizer, loader, nn.CrossEntropyLoss(), EPOCHS)
    assert engine.unlearner().unlearn(FORGET).weights_changed


EVERY_METHOD_OPTIONS = {"retrain": {}, "finetune": {}, "topk": {}, "randomk": {}, "mini": {}, "deltagrad": {},
                        "pcmu": {"clip_norm": 1.0, "tau": 0.006, "sigma": 0.01, "max_request": N}}


@pytest.mark.parametrize("method", list(EVERY_METHOD_OPTIONS))
def test_forgetting_every_training_id_through_the_ledger_is_retraining_or_refused_before_work(method, tmp_path):
    """The last request leaves nothing retained (the first forgot some ids already). Retraining on
    no data makes no update: a method answers with the initial weights, reported as retraining, or
    -- fine-tuning, Top-K, Random-k, whose answer trains on the retained data -- is refused by name
    before any work, the model and the ledger left as they were. Never 'unlearned' on nothing."""
    torch.manual_seed(0)
    model = cnn("group")
    loader = torch.utils.data.DataLoader(LazyImages(N), batch_size=BATCH, shuffle=True)
    engine = ue.UnlearningEngine()
    model, optimizer, loader = engine.make_unlearnable(model, torch.optim.SGD(model.parameters(), lr=0.05), loader,
                                                       method=method, epochs=EPOCHS, **EVERY_METHOD_OPTIONS[method])
    user_loop(model, optimizer, loader, nn.CrossEntropyLoss(), EPOCHS)
    ledger = ue.DeletionLedger(engine.unlearner(), str(tmp_path))
    ledger.forget(FORGET)
    rest = [i for i in range(N) if i not in FORGET]
    if method in ("finetune", "topk", "randomk"):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match=f"^{method}: the request would forget every one of the {N} training "
                                             "samples, but .* retained data.*use method='retrain'"):
            ledger.forget(rest)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert sorted(ledger.unlearner.forgotten.tolist()) == sorted(FORGET)
        return
    report = ledger.forget(rest)
    assert report.status == "retrained", report
    assert same_state(model, engine.initial)
    assert sorted(ledger.unlearner.forgotten.tolist()) == list(range(N))
