"""Prompt deletion: defined answers for every kind of request, and a ledger that survives a
restart and a crash in the middle of a request."""
import json
import os

import pytest
import torch

from unlearn_ext.pcmu.deleter_old import LEDGER, PromptDeleter, UnknownIdsError

from pcmu_settings import digits_trainer, first_difference, params_equal, synthetic_trainer


def test_within_budget_is_certified_at_once_and_model_unchanged(tmp_path):
    trainer = synthetic_trainer().train(steps=20)
    before = [p.clone() for p in trainer.params]
    deleter = PromptDeleter(trainer, str(tmp_path))
    answer = deleter.forget([5])
    assert answer.status == "certified" and answer.how == "a-priori (m*)" and not answer.model_changed
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.params))
    assert deleter.forgotten == [5]


def test_divergent_request_is_retrained_exactly(tmp_path):
    trainer = digits_trainer().train(epochs=6)
    deleter = PromptDeleter(trainer, str(tmp_path))
    answer = deleter.forget([17, 300])
    if answer.status == "certified":
        pytest.skip("request was certified; the fallback is covered by test_pcmu")
    assert answer.status == "retrained" and answer.model_changed and "step" in answer.reason
    retrained = digits_trainer(exclude=torch.tensor([17, 300])).train(epochs=6)
    assert params_equal(trainer, retrained) and first_difference(trainer, retrained) is None


def test_sequential_requests_accumulate(tmp_path):
    trainer = digits_trainer().train(epochs=6)
    deleter = PromptDeleter(trainer, str(tmp_path))
    deleter.forget([4])
    deleter.forget([900, 901])
    retrained = digits_trainer(exclude=torch.tensor([4, 900, 901])).train(epochs=6)
    assert params_equal(trainer, retrained)
    assert sorted(deleter.forgotten) == [4, 900, 901]


def test_unknown_duplicate_repeat_and_empty_requests(tmp_path):
    trainer = synthetic_trainer().train(steps=3)
    deleter = PromptDeleter(trainer, str(tmp_path))
    with pytest.raises(UnknownIdsError, match=r"\[20000, 99999\]"):
        deleter.forget([1, 20000, 99999])
    assert deleter.requests == [] and deleter.forgotten == []  # nothing recorded or changed
    with pytest.raises(ValueError, match="empty"):
        deleter.forget([])
    with pytest.raises(TypeError, match="ids must be integers"):  # 1.5 would silently become id 1
        deleter.forget([1.5])
    with pytest.raises(TypeError, match="removed must be integers"):
        trainer.check_request(torch.tensor([True]))
    assert deleter.requests == [] and deleter.forgotten == []
    first = deleter.forget([7, 7, 8])
    assert first.duplicates == [7] and first.ids == [7, 8]
    again = deleter.forget([8, 7])
    assert again.status == "already-forgotten" and again.repeats == [7, 8] and not again.model_changed
    mixed = deleter.forget([8, 9])
    assert mixed.repeats == [8] and mixed.ids == [9]
    assert [r["status"] for r in deleter.requests] == ["certified", "already-forgotten", "certified"]


def test_ledger_survives_a_restart(tmp_path):
    trainer = digits_trainer().train(epochs=6)
    deleter = PromptDeleter(trainer, str(tmp_path))
    deleter.forget([10])
    deleter.forget([11, 12])
    params = [p.clone() for p in trainer.params]
    # A new process: the same model, data and configuration, freshly trained (different weights
    # would be restored from the ledger's state).
    fresh = digits_trainer()
    reopened = PromptDeleter(fresh, str(tmp_path))
    assert sorted(reopened.forgotten) == [10, 11, 12] and len(reopened.requests) == 2
    assert all(torch.equal(a, b) for a, b in zip(params, fresh.params))
    assert fresh.steps_done == trainer.steps_done
    assert reopened.forget([10]).status == "already-forgotten"
    with open(os.path.join(tmp_path, LEDGER)) as f:
        assert len(json.load(f)["requests"]) == 3


def test_crash_while_saving_keeps_the_previous_ledger(tmp_path, monkeypatch):
    trainer = synthetic_trainer().train(steps=3)
    deleter = PromptDeleter(trainer, str(tmp_path))
    deleter.forget([1])

    def dying_save(*args, **kwargs):
        raise OSError("simulated crash while writing the state")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="simulated crash"):
        deleter.forget([2])
    monkeypatch.undo()
    reopened = PromptDeleter(synthetic_trainer(), str(tmp_path))
    assert reopened.forgotten == [1] and len(reopened.requests) == 1


def test_state_of_another_configuration_is_refused(tmp_path):
    PromptDeleter(synthetic_trainer().train(steps=2), str(tmp_path)).forget([3])
    with pytest.raises(ValueError, match="another model or configuration.*tau"):
        PromptDeleter(synthetic_trainer(tau=0.2), str(tmp_path))
