"""TrainingData, the SGD loop over the batch schedule, and retrain(): the gold standard every
method is compared with must be deterministic, must never see the forgotten samples, and must keep
the original batch order with the forgotten ids deleted inside their batches."""
import pytest
import torch

import unlearn_ext as ue
from unlearn_ext.data import BatchSchedule


def small_data(n=90, d=6, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    y = torch.randint(0, classes, (n,), generator=gen)
    ids = torch.arange(1000, 1000 + 3 * n, 3)  # ids are not row numbers
    return ue.TrainingData(x, y, ids=ids)


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


CONFIG = ue.SGDConfig(epochs=3, batch_size=16, lr=lambda t: 0.2 / (1 + 0.05 * t), weight_decay=1e-3, seed=4)


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_training_data_rows_unknown_and_checks():
    data = small_data()
    assert torch.equal(data.rows(torch.tensor([1003, 1000])), torch.tensor([1, 0]))
    assert data.unknown_ids([1000, 1001, 5]).tolist() == [1001, 5]
    assert data.without([1000, 1003]).numel() == len(data) - 2
    with pytest.raises(ValueError, match="unique"):
        ue.TrainingData(torch.zeros(2, 1), torch.zeros(2), ids=[4, 4])
    with pytest.raises(ValueError, match="rows"):
        ue.TrainingData(torch.zeros(3, 1), torch.zeros(2))
    with pytest.raises(TypeError, match="integers"):
        ue.TrainingData(torch.zeros(2, 1), torch.zeros(2), ids=[0.5, 1.5])


def test_retrain_without_nothing_reproduces_training_bit_for_bit():
    data, initial = small_data(), mlp()
    trained = ue.train_sgd(mlp(), data, CONFIG)
    again = ue.retrain(initial, data, CONFIG, forgotten=[])
    assert torch.equal(flat(trained), flat(again))
    assert torch.equal(flat(initial), flat(mlp()))  # retrain copies; the initial model is untouched


def test_retrain_never_sees_the_forgotten_samples():
    """Replacing the forgotten samples' inputs and labels with garbage changes nothing."""
    data, initial = small_data(), mlp()
    forget = data.ids[[2, 17, 40, 41, 88]]
    clean = ue.retrain(initial, data, CONFIG, forget)
    x, y = data.inputs.clone(), data.targets.clone()
    rows = data.rows(forget)
    x[rows], y[rows] = 1e3, 2
    poisoned = ue.retrain(initial, ue.TrainingData(x, y, ids=data.ids), CONFIG, forget)
    assert torch.equal(flat(clean), flat(poisoned))
    full = ue.retrain(initial, data, CONFIG, [])
    assert not torch.equal(flat(clean), flat(full))  # and removing them does change the model


def test_retrain_keeps_the_batch_order_minus_the_forgotten_ids():
    data = small_data()
    forget = data.ids[:10]
    seen = []
    ue.train_sgd(mlp(), data, CONFIG, exclude=forget, on_step=lambda t, ids, model: seen.append(ids.clone()))
    schedule = BatchSchedule(data.ids, CONFIG.batch_size, CONFIG.seed)
    assert len(seen) == CONFIG.steps(len(data))
    for t, ids in enumerate(seen):
        full = schedule.step(t).ids
        assert torch.equal(ids, full[~torch.isin(full, forget)])  # deleted inside, never re-chunked


def test_an_emptied_batch_makes_no_update():
    data = small_data(n=20)
    config = ue.SGDConfig(epochs=1, batch_size=10, lr=0.5, seed=0)
    first_batch = BatchSchedule(data.ids, 10, 0).step(0).ids
    model = mlp()
    trained = ue.train_sgd(model, data, ue.SGDConfig(epochs=1, batch_size=10, lr=0.5, seed=0),
                           exclude=data.ids)
    assert torch.equal(flat(trained), flat(mlp()))
    partial = ue.retrain(mlp(), data, config, first_batch)  # only the second batch trains
    assert not torch.equal(flat(partial), flat(mlp()))


def test_retrain_cost_counts_retained_samples_per_epoch():
    data = small_data()
    assert ue.retrain_cost(data, CONFIG, []) == 3 * len(data)
    assert ue.retrain_cost(data, CONFIG, data.ids[:7]) == 3 * (len(data) - 7)


def test_retrain_unlearner_through_the_ledger_matches_retrain_and_restarts(tmp_path):
    """Any Unlearner works with the ledger: the retraining baseline answers sequential requests
    exactly like one retrain without their union, survives a restart, and repeats are idempotent."""
    data, initial = small_data(), mlp()
    model = ue.train_sgd(mlp(), data, CONFIG)
    ledger = ue.DeletionLedger(ue.RetrainUnlearner(model, initial, data, CONFIG), str(tmp_path))
    first = ledger.forget([1000, 1003])
    second = ledger.forget([1003, 1006, 1006])
    assert first.status == second.status == "retrained" and first.cost_vs_retrain == 1.0
    assert second.ids == [1006] and second.repeats == [1003] and second.duplicates == [1006]
    expected = ue.retrain(initial, data, CONFIG, [1000, 1003, 1006])
    assert torch.equal(flat(model), flat(expected))
    with pytest.raises(ue.UnknownIdsError, match=r"\[1001\]"):
        ledger.forget([1001])
    ledger.close()
    fresh = ue.train_sgd(mlp(), data, CONFIG)
    reopened = ue.DeletionLedger(ue.RetrainUnlearner(fresh, initial, data, CONFIG), str(tmp_path))
    assert torch.equal(flat(fresh), flat(expected)) and reopened.forgotten == [1000, 1003, 1006]
    assert reopened.forget([1006]).status == "already-forgotten"
    reopened.close()
    other = ue.SGDConfig(epochs=2, batch_size=16, lr=0.1, seed=4)
    with pytest.raises(ValueError, match="another model or configuration.*epochs"):
        ue.DeletionLedger(ue.RetrainUnlearner(mlp(), initial, data, other), str(tmp_path))


def test_ids_beyond_int64_are_refused_not_wrapped():
    import numpy as np
    from unlearn_ext.data import as_ids
    with pytest.raises(ValueError, match="2\\^63"):
        as_ids(np.array([2**63 + 5], dtype=np.uint64))
    with pytest.raises(ValueError, match="int64"):
        as_ids([2**63 + 5])
    assert as_ids(np.array([7], dtype=np.uint64)).tolist() == [7]


def test_fingerprint_covers_values_and_row_order():
    """Same shapes, other content: saved state of one must not be accepted for the other."""
    data = small_data()
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(1))
    shuffled = ue.TrainingData(data.inputs[perm], data.targets[perm], ids=data.ids)
    relabeled = ue.TrainingData(data.inputs, (data.targets + 1) % 3, ids=data.ids)
    same = ue.TrainingData(data.inputs.clone(), data.targets.clone(), ids=data.ids.clone())
    assert data.fingerprint() == same.fingerprint()
    assert data.fingerprint() != shuffled.fingerprint()
    assert data.fingerprint() != relabeled.fingerprint()


def test_ledger_refuses_state_of_shuffled_data(tmp_path):
    data, initial = small_data(), mlp()
    model = ue.train_sgd(mlp(), data, CONFIG)
    with ue.DeletionLedger(ue.RetrainUnlearner(model, initial, data, CONFIG), str(tmp_path)) as ledger:
        ledger.forget([1000])
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(1))
    shuffled = ue.TrainingData(data.inputs[perm], data.targets[perm], ids=data.ids)
    with pytest.raises(ValueError, match="data_sha256"):
        ue.DeletionLedger(ue.RetrainUnlearner(mlp(), initial, shuffled, CONFIG), str(tmp_path))
