"""The deletion ledger of a 2-rank gloo job (unlearn_ext.distributed.ledger) when a rank dies after
every rank agreed on a request, around rank 0's commit: forget() returns on a surviving rank only if
the ledger on disk holds the request, and raises only if that rank holds its state from before it.
Rank 0 that committed and cannot tell a dead rank 1 returns the report; rank 1 that never gets the
decision of a dead rank 0 follows the ledger on disk (committed: kept; not committed: rolled back),
and, unable to read it, rolls back and says the outcome is unknown."""
from __future__ import annotations

import os
import tempfile

import pytest
import torch

import unlearn_ext.distributed.ledger as distributed_ledger
from unlearn_ext.distributed import DistributedLedger, DistributedPCMUTrainer
from unlearn_ext.distributed.ledger import state_digest
from unlearn_ext.ledger import read_ledger
from unlearn_ext.pcmu import PCMUUnlearner
from distributed_setup import GROUP_TIMEOUT_S, launch
from pcmu_settings import digits_data
from test_distributed_ledger import FIRST, OPTIONS, TIMEOUT_S, _attempt, _model


def _die(*args, **kwargs):
    os._exit(3)


def _unreadable(directory):
    raise PermissionError(f"injected: {directory} is not mounted on this rank")


def decision_worker(rank, world, x, y, directory, case):
    trainer = DistributedPCMUTrainer(_model(), torch.nn.functional.cross_entropy, (x, y), **OPTIONS)
    trainer.train(epochs=1)
    unlearner = PCMUUnlearner(trainer)
    ledger = DistributedLedger(unlearner, directory)
    before = state_digest(unlearner.state_dict())
    if case == "rank 1 dies after agreeing" and rank == 1:
        ledger._commit_flag = _die  # (made right before the decision's broadcast)
    if case.startswith("rank 0 dies after committing") and rank == 0:
        ledger._commit_flag = _die  # (made after a durable commit, before its broadcast)
    if case == "rank 0 dies after committing, rank 1 cannot read the ledger" and rank == 1:
        distributed_ledger.read_ledger = _unreadable
    if case == "rank 0 dies before committing" and rank == 0:
        ledger._ledger._commit = _die
    message, seconds = _attempt(lambda: ledger.forget(FIRST if rank == 0 else None))
    return message, seconds, state_digest(unlearner.state_dict()) != before


@pytest.mark.parametrize("case, survivor, committed", [
    ("rank 1 dies after agreeing", 0, True),
    ("rank 0 dies after committing", 1, True),
    ("rank 0 dies after committing, rank 1 cannot read the ledger", 1, True),
    ("rank 0 dies before committing", 1, False),
])
def test_a_survivor_keeps_the_request_iff_the_ledger_on_disk_committed_it(case, survivor, committed):
    x, y, _, _ = digits_data()
    with tempfile.TemporaryDirectory() as job_dir:
        got = launch(decision_worker, 2, TIMEOUT_S, x, y, job_dir, case, may_die=(1 - survivor,))
        on_disk = [r["ids"] for r in read_ledger(job_dir)["requests"]]
    assert got[1 - survivor] is None, case  # the other rank died on purpose
    message, seconds, applied = got[survivor]
    assert on_disk == ([sorted(FIRST)] if committed else []), (case, on_disk)
    assert seconds < GROUP_TIMEOUT_S + 5, (case, seconds)
    if "cannot read" in case:  # the outcome cannot be known here: the state from before, said so
        assert not applied and "whether the request was committed is unknown" in message, (case, message)
        assert "injected: " in message and "reopen the DistributedLedger" in message, (case, message)
    elif committed:  # returned, holding the request, as the ledger on disk
        assert message == "no error" and applied, (case, message)
    else:
        assert message != "no error" and not applied, (case, message)
        assert "does not hold the request: rolled back" in message, (case, message)


def _disk_full(*args, **kwargs):
    raise OSError(28, "injected: No space left on device")


def pre_commit_worker(rank, world, x, y, directory):
    trainer = DistributedPCMUTrainer(_model(), torch.nn.functional.cross_entropy, (x, y), **OPTIONS)
    trainer.train(epochs=1)
    unlearner = PCMUUnlearner(trainer)
    ledger = DistributedLedger(unlearner, directory)
    ledger.forget(FIRST if rank == 0 else None)  # a request every rank agreed on and rank 0 committed
    trainer.train(steps=1)  # more training: rank 0's ledger commits it first at the next request
    before = state_digest(unlearner.state_dict())
    if rank == 0:
        ledger._ledger._commit = _disk_full  # that commit fails, before the unlearner runs
    message, seconds = _attempt(lambda: ledger.forget([3, 4, 5] if rank == 0 else None))
    return message, seconds, state_digest(unlearner.state_dict()) == before


def test_rank0_failing_before_the_unlearner_runs_is_refused_on_every_rank_at_once():
    """DeletionLedger.forget on rank 0 commits the training done since the last request before it
    runs the unlearner; when that fails, every rank is refused in the ids' agreement, naming rank
    0's error. (It failed inside rank 0's
    DeletionLedger.forget, while the others ran the unlearner's collectives: a transport error on
    every rank at the group's timeout, rank 0 having sent the previous request's 'not committed'
    flag into those collectives.)"""
    x, y, _, _ = digits_data()
    with tempfile.TemporaryDirectory() as job_dir:
        got = launch(pre_commit_worker, 2, TIMEOUT_S, x, y, job_dir)
        on_disk = [r["ids"] for r in read_ledger(job_dir)["requests"]]
    assert on_disk == [sorted(FIRST)], on_disk
    for rank, (message, seconds, unchanged) in enumerate(got):
        assert message.startswith("DistributedRefusal: rank(s) [0] ") and "injected: No space left" in message, \
            (rank, message)
        assert seconds < GROUP_TIMEOUT_S / 2 and unchanged, (rank, seconds, unchanged)
