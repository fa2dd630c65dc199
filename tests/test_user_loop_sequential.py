"""A DataLoader with shuffle=False (a SequentialSampler) is honoured, not replaced by the seeded
shuffle: the wrapped loader yields the dataset's own order every epoch, and everything that repeats
the run -- the recipe's retraining, the history methods' exact fallback, PCMU's trainer and the
fingerprints that identify a run -- follows that order."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import unlearn_ext as ue
from unlearn_ext.pcmu import PCMUTrainer
from user_models import LazyImages, cnn, same_state, user_loop

N, BATCH, EPOCHS = 48, 16, 2
FORGET = [3, 17, 42]


def sequential_batches(exclude=()):
    """The dataset's order cut into batches, `exclude` deleted inside its batches (never re-chunked)."""
    return [[i for i in range(lo, min(lo + BATCH, N)) if i not in exclude] for lo in range(0, N, BATCH)]


def wrap(method, optimizer_of=lambda m: torch.optim.SGD(m.parameters(), lr=0.05), **options):
    torch.manual_seed(0)
    model = cnn("group")
    optimizer = optimizer_of(model)
    loader = torch.utils.data.DataLoader(LazyImages(N), batch_size=BATCH, shuffle=False)
    engine = ue.UnlearningEngine()
    model, optimizer, loader = engine.make_unlearnable(model, optimizer, loader, method=method, epochs=EPOCHS,
                                                       loss_fn=nn.CrossEntropyLoss(), **options)
    return engine, model, optimizer, loader


def my_sequential_run(engine, exclude=()):
    """The user's loop over their own shuffle=False loader (minus `exclude`), written here."""
    model = copy.deepcopy(engine.initial)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    torch.set_rng_state(engine.recipe.rng_state)
    loader = torch.utils.data.DataLoader(LazyImages(N), batch_sampler=sequential_batches(exclude))
    return user_loop(model, optimizer, loader, nn.CrossEntropyLoss(), EPOCHS)


@pytest.mark.parametrize("method", ["retrain", "mini", "deltagrad", "topk"])
def test_the_wrapped_loader_yields_the_datasets_order_every_epoch(method):
    engine, _, _, loader = wrap(method)
    mine = torch.utils.data.DataLoader(LazyImages(N), batch_size=BATCH, shuffle=False)
    for _ in range(EPOCHS):
        got, want = list(loader), list(mine)
        assert len(got) == len(want)
        for (x, y), (x0, y0) in zip(got, want):
            assert torch.equal(x, x0) and torch.equal(y, y0)
    assert engine.recipe.shuffle is False
    assert engine.recipe.fingerprint()["shuffle"] is False


def test_the_users_sequential_run_and_its_retraining_are_the_plain_sequential_loop_bit_for_bit():
    engine, model, optimizer, loader = wrap("retrain")
    user_loop(model, optimizer, loader, nn.CrossEntropyLoss(), EPOCHS)
    assert same_state(model, my_sequential_run(engine))
    assert same_state(ue.retrain(engine.initial, engine.data, engine.recipe, FORGET), my_sequential_run(engine, FORGET))
    engine.unlearner().unlearn(FORGET)
    assert same_state(model, my_sequential_run(engine, FORGET))


def test_mini_unlearnings_exact_fallback_retrains_in_the_sequential_order():
    """A request forced to the exact fallback replays the run without F from the stored initial
    weights in the order the history's run metadata names: the sequential one the loop trained.
    (DeltaGrad's fallback replays its recorded batch ids; its metadata carries the order too.)"""
    engine, model, optimizer, loader = wrap("mini", loss_rise_limit=-1.0)  # a limit no answer meets
    user_loop(model, optimizer, loader, nn.CrossEntropyLoss(), EPOCHS)
    unlearner = engine.unlearner()
    assert unlearner.store.run_info["batch_shuffle"] is False
    report = unlearner.unlearn(FORGET)
    assert report.status == "fallback", report.reason
    gold = my_sequential_run(engine, FORGET)
    for got, want in zip(model.parameters(), gold.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_deltagrads_history_names_the_sequential_order():
    engine, model, optimizer, loader = wrap("deltagrad")
    user_loop(model, optimizer, loader, nn.CrossEntropyLoss(), EPOCHS)
    store = engine.unlearner().store
    assert store.run_info["batch_shuffle"] is False
    assert [store.read(t).batch_ids.tolist() for t in range(len(sequential_batches()))] == sequential_batches()


def test_pcmu_records_the_sequential_order_and_its_fingerprint_says_so():
    """PCMU in the loop is PCMUTrainer(shuffle=False)'s run bit for bit; the shuffled trainer's is another."""
    options = dict(clip_norm=1.0, tau=0.006, sigma=0.01, max_request=3)
    engine, model, optimizer, loader = wrap("pcmu", **options)
    user_loop(model, optimizer, loader, nn.CrossEntropyLoss(), EPOCHS)
    trainer = optimizer.trainer
    assert trainer.fingerprint()["shuffle"] is False
    for t in range(trainer.steps_done):
        assert trainer.batch_ids(t).tolist() == sequential_batches()[t % len(sequential_batches())]
    runs = {}
    for shuffle in (False, True):
        reference = PCMUTrainer(copy.deepcopy(engine.initial), None, ue.TrainingData(LazyImages(N)), batch_size=BATCH,
                                seed=0, lr=0.05, shuffle=shuffle, **options)
        runs[shuffle] = reference.train(epochs=EPOCHS).model
    assert same_state(model, runs[False])
    assert not same_state(model, runs[True])


@pytest.mark.parametrize("method", ["retrain", "topk"])
def test_a_ledger_of_a_shuffled_run_is_refused_for_the_sequential_run(method, tmp_path):
    """The order is part of what identifies a run: reopening names the difference."""
    torch.manual_seed(0)
    model = cnn("group")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = torch.utils.data.DataLoader(LazyImages(N), batch_size=BATCH, shuffle=True)
    shuffled = ue.UnlearningEngine()
    model, optimizer, loader = shuffled.make_unlearnable(model, optimizer, loader, method=method, epochs=EPOCHS)
    user_loop(model, optimizer, loader, nn.CrossEntropyLoss(), EPOCHS)
    with ue.DeletionLedger(shuffled.unlearner(), tmp_path) as ledger:
        ledger.forget(FORGET[:1])
    engine, model, optimizer, loader = wrap(method)
    user_loop(model, optimizer, loader, nn.CrossEntropyLoss(), EPOCHS)
    with pytest.raises(ValueError, match="differs in: (shuffle|recipe)"):
        ue.DeletionLedger(engine.unlearner(), tmp_path)
