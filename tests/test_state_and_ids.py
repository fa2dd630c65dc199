"""Buffers are part of a model's state (a restart through the ledger gives the outputs of the model
that committed), and ids / seeds are integers: every other input is refused by name."""
import numpy as np
import pytest
import torch

import unlearn_ext as ue
from unlearn_ext.data import as_ids
from unlearn_ext.ledger import DeletionLedger
from unlearn_ext.model_state import load_model_state_, model_state  # noqa
from unlearn_ext.reference import select as RS

from ledger_methods_setup import Setting, same


@pytest.mark.parametrize("method", ["topk", "randomk"])
def test_a_restart_restores_batch_norm_statistics(method, tmp_path):
    """The repair runs in training mode and moves BatchNorm's running statistics; reopening the
    ledger gives exactly the committed model, eval outputs included."""
    s = Setting(method)
    with DeletionLedger(s.unlearner(), str(tmp_path)) as ledger:
        ledger.forget([3, 4])
        committed = ledger.unlearner.model
        assert not same(model_state(committed)["buffers"], model_state(s.trained)["buffers"])  # it moved them
        committed.eval()
        expected = committed(s.data.inputs)
    fresh = s.unlearner()
    with DeletionLedger(fresh, str(tmp_path)):
        fresh.model.eval()
        assert torch.equal(fresh.model(s.data.inputs), expected)


def test_model_state_round_trip_and_refusals():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    model[0].bias.requires_grad_(False)  # frozen: not a trainable parameter
    state = model_state(model)
    assert sorted(state["params"]) == ["0.weight", "1.bias", "1.weight"]
    assert sorted(state["buffers"]) == ["1.num_batches_tracked", "1.running_mean", "1.running_var"]
    model(torch.randn(8, 3))  # training mode: moves the running statistics
    with torch.no_grad():
        model[0].weight.add_(1.0)
    load_model_state_(model, state)
    assert same(model_state(model), state)
    state["params"]["0.weight"] = state["params"]["0.weight"][:2]
    with pytest.raises(ValueError, match=r"parameter '0.weight' has shape \(2, 3\); the model's is \(4, 3\)"):
        load_model_state_(model, state)
    state = model_state(model)
    del state["buffers"]["1.running_var"]
    with pytest.raises(ValueError, match=r"model's buffers: missing \['1.running_var'\]"):
        load_model_state_(model, state)


@pytest.mark.parametrize("ids", [[5, True], [True], ["3"], "3", None, [None], [1, 2.0], np.array([1.0])])
def test_ids_that_are_not_integers_are_refused(ids):
    with pytest.raises(TypeError, match="ids must be integers"):
        as_ids(ids)


def test_ids_beyond_int64_and_meta_tensors_are_refused():
    for big in (np.uint64(2**63), [2**63], np.array([2**63], dtype=np.uint64)):
        with pytest.raises(ValueError, match="ids must be integers in the int64 range"):
            as_ids(big)
    with pytest.raises(TypeError, match="ids must be integers with values; got a meta tensor"):
        as_ids(torch.empty(2, dtype=torch.int64, device="meta"))


def test_an_unlearner_refuses_a_bool_among_the_ids():
    """[5, True] once forgot ids 1 and 5."""
    s = Setting("randomk")
    u = s.unlearner()
    with pytest.raises(TypeError, match="ids must be integers, got bool True"):
        u.unlearn([5, True])
    assert u.forgotten.tolist() == [] and u.requests == 0


def test_integer_ids_of_every_kind_still_work():
    assert as_ids([np.int32(4), 7, [torch.tensor(2)]]).tolist() == [4, 7, 2]
    assert as_ids(np.array([3, 1], dtype=np.uint64)).tolist() == [3, 1]
    assert as_ids(torch.tensor([[1, 2], [3, 4]], dtype=torch.int16)).tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize("seed", [2**63, 2**64 - 1])
def test_random_k_takes_unsigned_64_bit_seeds(seed):
    like = [torch.randn(50), torch.randn(13)]
    got = torch.cat([m.reshape(-1) for m in ue.random_k(like, 9, seed=seed).masks(like)]).cpu()
    keys, _ = RS.keys_of(like, 2, seed, 0, 0)
    want = torch.zeros(keys.numel(), dtype=torch.bool)
    want[torch.sort(keys, descending=True, stable=True).indices[:9]] = True
    assert torch.equal(got, want)


def test_random_k_refuses_negative_seeds():
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\^64\), got -1"):
        ue.random_k([torch.randn(5)], 2, seed=-1)
