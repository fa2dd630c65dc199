"""Prompt deletion through the generic ledger (PCMU as the Unlearner): defined answers for every
kind of request, and a ledger that survives a restart, a crash in the middle of a request, a
directory it cannot write, and a second writer."""
import os

import pytest
import torch

from unlearn_ext.ledger import DeletionLedger, LedgerInUseError, read_ledger
from unlearn_ext.pcmu import PCMUUnlearner
from unlearn_ext.unlearner import UnknownIdsError

from pcmu_settings import digits_trainer, first_difference, params_equal, synthetic_trainer


def PromptDeleter(trainer, directory):
    """A PCMU trainer behind the generic ledger (what PromptDeleter was before the Unlearner
    interface). Each test's ledger is closed when the test's objects are collected; tests that reopen
    a directory close the first ledger explicitly (the directory lock allows one writer)."""
    return DeletionLedger(PCMUUnlearner(trainer), directory)


def test_within_budget_is_certified_at_once_and_model_unchanged(tmp_path):
    trainer = synthetic_trainer().train(steps=20)
    before = [p.clone() for p in trainer.params]
    deleter = PromptDeleter(trainer, str(tmp_path))
    answer = deleter.forget([5])
    assert answer.status == "certified" and answer.how == "a-priori (m*)" and not answer.weights_changed
    assert answer.method == "pcmu" and answer.sample_gradients == 0 and answer.cost_vs_retrain == 0
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.params))
    assert deleter.forgotten == [5]


def test_divergent_request_is_retrained_exactly(tmp_path):
    trainer = digits_trainer().train(epochs=6)
    deleter = PromptDeleter(trainer, str(tmp_path))
    answer = deleter.forget([17, 300])
    if answer.status == "certified":
        pytest.skip("request was certified; the fallback is covered by test_pcmu")
    assert answer.status == "retrained" and answer.weights_changed and "step" in answer.reason
    assert 0 < answer.sample_gradients and answer.cost_vs_retrain is not None
    assert answer.details["steps_retrained"] == trainer.steps_done - answer.details["first_divergent_step"]
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
    assert again.status == "already-forgotten" and again.repeats == [7, 8] and not again.weights_changed
    mixed = deleter.forget([8, 9])
    assert mixed.repeats == [8] and mixed.ids == [9]
    assert [r["status"] for r in deleter.requests] == ["certified", "already-forgotten", "certified"]


def test_ledger_survives_a_restart(tmp_path):
    trainer = digits_trainer().train(epochs=6)
    deleter = PromptDeleter(trainer, str(tmp_path))
    deleter.forget([10])
    deleter.forget([11, 12])
    params = [p.clone() for p in trainer.params]
    deleter.close()
    # A new process: the same model, data and configuration, freshly trained (different weights
    # would be restored from the ledger's state).
    fresh = digits_trainer()
    reopened = PromptDeleter(fresh, str(tmp_path))
    assert sorted(reopened.forgotten) == [10, 11, 12] and len(reopened.requests) == 2
    assert all(torch.equal(a, b) for a, b in zip(params, fresh.params))
    assert fresh.steps_done == trainer.steps_done
    assert reopened.forget([10]).status == "already-forgotten"
    assert len(read_ledger(str(tmp_path))["requests"]) == 3


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
    assert deleter.forgotten == [1]  # the failed request was rolled back in memory too
    deleter.close()
    reopened = PromptDeleter(synthetic_trainer(), str(tmp_path))
    assert reopened.forgotten == [1] and len(reopened.requests) == 1


def test_state_of_another_configuration_is_refused(tmp_path):
    with PromptDeleter(synthetic_trainer().train(steps=2), str(tmp_path)) as first:
        first.forget([3])
    with pytest.raises(ValueError, match="another model or configuration.*tau"):
        PromptDeleter(synthetic_trainer(tau=0.2), str(tmp_path))


def test_read_only_directory_changes_nothing(tmp_path, monkeypatch):
    """A request that cannot be committed must not happen in memory either (a retry would
    otherwise answer 'already-forgotten' for a deletion that never succeeded). Permissions are
    simulated through os.access, because CI runs as root, which may write anywhere."""
    import unlearn_ext.ledger as ledger_module
    trainer = digits_trainer().train(epochs=1)
    deleter = PromptDeleter(trainer, str(tmp_path))
    params = [p.clone() for p in trainer.params]
    monkeypatch.setattr(ledger_module.os, "access", lambda path, mode: False)
    with pytest.raises(PermissionError, match="not writable"):
        deleter.forget([3, 4])
    monkeypatch.undo()
    assert deleter.forgotten == [] and deleter.requests == []
    assert all(torch.equal(a, b) for a, b in zip(params, trainer.params))
    assert deleter.forget([3, 4]).status in ("certified", "retrained")


def test_failed_commit_rolls_back_a_retraining_request(tmp_path, monkeypatch):
    """The commit fails after the unlearner already retrained: weights, records and forgotten ids
    return to their state before the request, and the ledger on disk is unchanged."""
    trainer = digits_trainer().train(epochs=6)
    deleter = PromptDeleter(trainer, str(tmp_path))
    params = [p.clone() for p in trainer.params]
    codes = [r.codes.clone() for r in trainer.records]
    import unlearn_ext.ledger as ledger_module

    def full_disk(path, write):
        raise OSError("simulated full disk")

    monkeypatch.setattr(ledger_module, "atomic_write", full_disk)
    with pytest.raises(OSError, match="full disk"):
        deleter.forget([17, 300])
    monkeypatch.undo()
    assert deleter.forgotten == [] and deleter.requests == []
    assert all(torch.equal(a, b) for a, b in zip(params, trainer.params))
    assert all(torch.equal(a, r.codes) for a, r in zip(codes, trainer.records))
    on_disk = sorted(f for f in os.listdir(tmp_path) if f.endswith(".pt"))
    assert on_disk == sorted(deleter.ledger["parts"].values())  # nothing half-written left behind


def test_certified_request_writes_only_the_forgotten_ids(tmp_path):
    """A request that changes no weights must not rewrite the weights or the training record."""
    trainer = synthetic_trainer().train(steps=20)
    deleter = PromptDeleter(trainer, str(tmp_path))
    def stored():  # part -> its file, or its bytes when small enough to live inside ledger.json
        return {**deleter.ledger["parts"], **deleter.ledger["inline"]}
    before = stored()
    assert deleter.forget([5]).status == "certified"
    after = stored()
    changed = sorted(k for k in after if after[k] != before.get(k))
    assert changed == ["forgotten"]
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".pt")) == sorted(deleter.ledger["parts"].values())


def test_second_writer_is_refused(tmp_path):
    deleter = PromptDeleter(synthetic_trainer().train(steps=2), str(tmp_path))
    with pytest.raises(LedgerInUseError, match="open elsewhere"):
        PromptDeleter(synthetic_trainer(), str(tmp_path))
    deleter.close()
    PromptDeleter(synthetic_trainer(), str(tmp_path)).close()  # free again once closed


def test_second_process_is_refused(tmp_path):
    """The lock is per directory across processes, not only inside one."""
    import subprocess
    import sys
    deleter = PromptDeleter(synthetic_trainer().train(steps=2), str(tmp_path))
    code = ("import fcntl, sys\n"
            f"f = open({str(tmp_path / 'ledger.lock')!r}, 'a+b')\n"
            "try:\n    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept OSError:\n    sys.exit(3)\n")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 3
    deleter.close()
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_check_request_refuses_unknown_ids():
    trainer = synthetic_trainer().train(steps=2)
    with pytest.raises(UnknownIdsError, match=r"\[-1, 20000\]"):
        trainer.check_request([20000, -1])


def test_remaining_budget_accounts_for_certified_deletions(tmp_path):
    """m* bounds the total removed from one batch over all requests (full batch here: every id is
    in every step), so after certified deletions the remaining budget shrinks accordingly, and a
    request within the remaining budget is still certified a priori."""
    trainer = synthetic_trainer().train(steps=20)
    m_star = trainer.certificate().budget
    assert m_star >= 3 and trainer.certificate().remaining_budget == m_star
    deleter = PromptDeleter(trainer, str(tmp_path))
    first = deleter.forget([1, 2])
    assert first.how == "a-priori (m*)" and first.details["remaining_budget"] == m_star - 2
    cert = trainer.certificate()
    assert cert.budget == m_star and cert.remaining_budget == m_star - 2
    assert cert.to_dict()["remaining_budget"] == m_star - 2 and f"{m_star - 2} left" in str(cert)
    rest = list(range(10, 10 + cert.remaining_budget))
    assert deleter.forget(rest).how == "a-priori (m*)"
    assert trainer.certificate().remaining_budget == 0


def test_check_request_refuses_empty_requests_and_ids_beyond_int64():
    trainer = synthetic_trainer().train(steps=2)
    with pytest.raises(ValueError, match="empty"):
        trainer.check_request([])
    with pytest.raises(ValueError, match="int64"):
        trainer.check_request([2**64 - 1])


def test_rounding_margin_is_part_of_the_fingerprint(tmp_path):
    with PromptDeleter(synthetic_trainer().train(steps=2), str(tmp_path)) as first:
        first.forget([3])
    with pytest.raises(ValueError, match="rounding_margin"):
        PromptDeleter(synthetic_trainer(rounding_margin=1e-3), str(tmp_path))
