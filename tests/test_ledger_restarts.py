"""Sequences of requests across restarts and journal folds give what one uninterrupted ledger gives;
ledgers of formats 6 (a snapshot without a journal) and 7 are read and upgraded by their next commit."""
import hashlib
import json
import os

import pytest

import unlearn_ext.ledger as ledger_module
from unlearn_ext.ledger import CHECKSUM, LEDGER, DeletionLedger, read_ledger
from unlearn_ext.pcmu import PCMUUnlearner

from ledger_methods_setup import requests_without_timing, same, without_timing
from pcmu_settings import digits_trainer

# Requests certified a priori (m* = 61 per batch of 350) and one that resumes training (70 ids in
# each batch), and a repeat.
REQUESTS = [[3], [900], list(range(0, 1400, 5)), [4, 6], [3], [1000, 1001], [77]]


def _unlearner():
    return PCMUUnlearner(digits_trainer(sigma=0.05, tau=0.2).train(epochs=2))


def _journals(directory) -> list:
    return sorted(n for n in os.listdir(directory) if n.startswith("journal-"))


def test_requests_with_restarts_and_folds_equal_one_uninterrupted_run(tmp_path, monkeypatch):
    with DeletionLedger(_unlearner(), str(tmp_path / "once")) as ledger:
        for ids in REQUESTS:
            ledger.forget(ids)
        state, requests = ledger.unlearner.state_dict(), requests_without_timing(ledger)
    assert {r["status"] for r in requests} == {"certified", "retrained", "already-forgotten"}
    assert len(_journals(tmp_path / "once")) == 1

    folds = []
    real_fold = DeletionLedger._fold

    def counted_fold(self, *args):
        folds.append(self.ledger["version"])
        return real_fold(self, *args)

    monkeypatch.setattr(DeletionLedger, "_fold", counted_fold)
    # Fold at every third commit: the journal is replaced between requests, not only appended to.
    monkeypatch.setattr(DeletionLedger, "_should_fold", lambda self, record_bytes: self.ledger["version"] % 3 == 0)
    directory = str(tmp_path / "restarted")
    for ids in REQUESTS:
        with DeletionLedger(_unlearner(), directory) as ledger:  # a restart before every request
            ledger.forget(ids)
            assert _journals(directory) == [ledger.ledger["journal"]]
    assert len(folds) >= 3
    with DeletionLedger(_unlearner(), directory) as ledger:
        assert same(ledger.unlearner.state_dict(), state)
        assert requests_without_timing(ledger) == requests
    assert without_timing(read_ledger(directory)["requests"]) == requests


@pytest.mark.parametrize("version", [6, 7])
def test_a_ledger_of_an_earlier_format_is_read_and_its_next_commit_writes_this_one(tmp_path, version):
    directory = str(tmp_path)
    with DeletionLedger(_unlearner(), directory) as ledger:
        ledger.forget([3])
        state = ledger.unlearner.state_dict()
        journal = ledger.ledger["journal"]
    old = read_ledger(directory)
    del old[CHECKSUM]
    old["format"] = f"unlearn_ext.ledger/{version}"
    if version == 6:  # what format 6 wrote: the same snapshot, every request in it, no journal
        del old["journal"]
        os.remove(os.path.join(directory, journal))
    else:  # format 7: its snapshot names the journal, whose records read_ledger merged into `old`
        with open(os.path.join(directory, LEDGER)) as f:
            old = dict(json.load(f), format=old["format"])
        del old[CHECKSUM]
    old[CHECKSUM] = hashlib.sha256(ledger_module._canonical(old)).hexdigest()
    with open(os.path.join(directory, LEDGER), "w") as f:
        json.dump(old, f, indent=1)

    with DeletionLedger(_unlearner(), directory) as ledger:
        assert same(ledger.unlearner.state_dict(), state) and len(ledger.requests) == 1
        ledger.forget([900])
        state = ledger.unlearner.state_dict()
    with open(os.path.join(directory, LEDGER)) as f:
        assert json.load(f)["format"] == ledger_module.FORMAT != old["format"]
    with DeletionLedger(_unlearner(), directory) as ledger:
        assert same(ledger.unlearner.state_dict(), state) and len(ledger.requests) == 2
