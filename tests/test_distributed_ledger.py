"""One ledger per job (unlearn_ext.distributed.ledger) with 2 gloo ranks running distributed PCMU:
a request is applied on every rank and committed once by rank 0, with the single-process ledger's
outcome; a refused request, a failure on one rank after its work, and a rank that dies mid-request
leave every surviving rank's state and the ledger on disk as they were, and the survivors raise
within the group's timeout instead of hanging."""
from __future__ import annotations

import os
import tempfile
import time

import torch

from unlearn_ext import DeletionLedger
from unlearn_ext.distributed import DistributedLedger, DistributedPCMUTrainer
from unlearn_ext.distributed.ledger import state_digest
from unlearn_ext.ledger import read_ledger
from unlearn_ext.pcmu import PCMUTrainer, PCMUUnlearner
from distributed_setup import GROUP_TIMEOUT_S, launch
from pcmu_settings import digits_data

TIMEOUT_S = 90
OPTIONS = dict(batch_size=350, clip_norm=1.0, lr=0.05, tau=0.006, sigma=0.01, max_request=3, seed=0)
FIRST = list(range(0, 1400, 70))     # 20 ids, 5 per batch: more than M = 3, so a resume
SECOND = [3, 4, 5]


def _model():
    torch.manual_seed(0)
    return torch.nn.Linear(64, 10)


def _ledger_bytes(directory):
    """Every file of the ledger (ledger.json, its journal, its parts), by name."""
    out = {}
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            out[name] = f.read()
    return out


def _attempt(call) -> tuple[str, float]:
    began = time.monotonic()
    try:
        call()
        return "no error", time.monotonic() - began
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}", time.monotonic() - began


def ledger_worker(rank, world, x, y, directory):
    trainer = DistributedPCMUTrainer(_model(), torch.nn.functional.cross_entropy, (x, y), **OPTIONS)
    trainer.train(epochs=1)
    unlearner = PCMUUnlearner(trainer)
    ledger = DistributedLedger(unlearner, directory)
    report = ledger.forget(FIRST if rank == 0 else None)  # rank 0 decides the request
    out = {"report": (report.status, report.how), "params": [p.detach().clone() for p in trainer.params]}
    after_first = state_digest(unlearner.state_dict())
    on_disk = _ledger_bytes(directory) if rank == 0 else None

    out["unknown"] = _attempt(lambda: ledger.forget([10**6]))
    real = unlearner.unlearn
    if rank == 1:  # this rank fails after doing its work: nobody may keep the request
        def failing(ids):
            real(ids)
            raise RuntimeError("injected failure after the work")
        unlearner.unlearn = failing
    out["one_rank_failed"] = _attempt(lambda: ledger.forget(SECOND))
    unlearner.unlearn = real
    out["rolled_back"] = state_digest(unlearner.state_dict()) == after_first
    out["ledger_unchanged"] = rank != 0 or _ledger_bytes(directory) == on_disk

    if rank == 1:  # dies in the middle of the next request's work
        def die(named, ids):
            os._exit(3)
        trainer._batch_sums64 = die
    out["dead_rank"] = _attempt(lambda: ledger.forget(SECOND))
    out["rolled_back_after_death"] = state_digest(unlearner.state_dict()) == after_first
    out["ledger_unchanged_after_death"] = rank != 0 or _ledger_bytes(directory) == on_disk
    out["requests"] = [(r["status"], r["how"], r["ids"]) for r in ledger.requests]
    ledger.close()
    return out


def test_two_ranks_one_ledger_same_result_or_none():
    x, y, _, _ = digits_data()
    trainer = PCMUTrainer(_model(), torch.nn.functional.cross_entropy, (x, y), **OPTIONS)
    trainer.train(epochs=1)
    with tempfile.TemporaryDirectory() as single_dir, tempfile.TemporaryDirectory() as job_dir:
        with DeletionLedger(PCMUUnlearner(trainer), single_dir) as single:
            want = single.forget(FIRST)
            want_requests = [(r["status"], r["how"], r["ids"]) for r in single.requests]
        got = launch(ledger_worker, 2, TIMEOUT_S, x, y, job_dir, may_die=(1,))
        committed = read_ledger(job_dir)["requests"]
    rank0 = got[0]
    assert got[1] is None  # rank 1 died on purpose
    assert rank0["report"] == (want.status, want.how) and want.status == "retrained"
    assert all(torch.equal(p, q) for p, q in zip(rank0["params"], trainer.params))
    assert rank0["requests"] == want_requests
    assert [(r["status"], r["how"], r["ids"]) for r in committed] == want_requests
    assert "never trained on" in rank0["unknown"][0] and "10" in rank0["unknown"][0]
    assert "rank(s) [1] refused" in rank0["one_rank_failed"][0]
    assert rank0["rolled_back"] and rank0["ledger_unchanged"]
    message, seconds = rank0["dead_rank"]
    assert message != "no error" and seconds <= GROUP_TIMEOUT_S + 5, rank0["dead_rank"]
    assert rank0["rolled_back_after_death"] and rank0["ledger_unchanged_after_death"]


def _refuse_state(state):
    raise ValueError("injected: not my state")


def exchange_worker(rank, world, x, y, directory):
    from distributed_setup import watch_collectives

    seen = watch_collectives()
    trainer = DistributedPCMUTrainer(_model(), torch.nn.functional.cross_entropy, (x, y), **OPTIONS)
    trainer.train(epochs=1)
    refusing = PCMUUnlearner(trainer)
    if rank == 1:  # cannot load rank 0's state: refused on every rank, rank 0's ledger closed again
        refusing.load_state_dict = _refuse_state
    out = {"refused_open": _attempt(lambda: DistributedLedger(refusing, directory))}
    ledger = DistributedLedger(PCMUUnlearner(trainer), directory)  # (the directory's lock was released)
    out["first"] = ledger.forget(FIRST if rank == 0 else [1, 2]).ids  # rank 0's request, not rank 1's
    out["not_integers"] = _attempt(lambda: ledger.forget([1.5] if rank == 0 else SECOND))
    out["empty"] = _attempt(lambda: ledger.forget([] if rank == 0 else SECOND))
    after_first = state_digest(ledger.unlearner.state_dict())
    ledger.close()
    # Reopened over a unlearner that never saw the request: rank 0 restores it from disk and every
    # other rank receives the restored state from rank 0.
    fresh = DistributedPCMUTrainer(_model(), torch.nn.functional.cross_entropy, (x, y), **OPTIONS)
    fresh.train(epochs=1)
    reopened = DistributedLedger(PCMUUnlearner(fresh), directory)
    out["restored"] = state_digest(reopened.unlearner.state_dict()) == after_first
    out["requests"] = [r["ids"] for r in reopened.requests]
    reopened.close()
    out["seen"] = seen
    return out


def test_the_ledgers_exchanges_are_tensor_collectives_on_the_groups_device():
    """Rank 0's ids and its restored state reach the other ranks through tensor collectives on the
    group's device, no object collective (which pickles, and under nccl needs torch.cuda.set_device
    on every rank); the ledger behaves as before: rank 0 decides the request, ids that are not
    integers and an empty request are refused on every rank, a reopened ledger restores every rank;
    a rank that cannot load rank 0's state refuses the opening on every rank."""
    x, y, _, _ = digits_data()
    with tempfile.TemporaryDirectory() as job_dir:
        got = launch(exchange_worker, 2, TIMEOUT_S, x, y, job_dir)
    for rank, out in enumerate(got):
        assert out["refused_open"][0] == ("DistributedRefusal: rank(s) [1] could not load rank 0's state: rank 1: "
                                          "ValueError: injected: not my state"), out["refused_open"]
        assert out["first"] == sorted(FIRST), rank
        assert out["not_integers"][0].startswith("DistributedRefusal: rank(s) [0]"), out["not_integers"]
        assert "must be integers" in out["not_integers"][0], out["not_integers"]
        assert "empty deletion request" in out["empty"][0], out["empty"]
        assert out["restored"], rank
        assert out["seen"] and all(device == expected for device, expected in out["seen"]), (rank, out["seen"])
    assert got[0]["requests"] == [sorted(FIRST)]


def test_the_state_digest_takes_zero_dim_tensors():
    """A state holding a 0-dim tensor wider than a byte (BatchNorm's num_batches_tracked, a step
    counter) has a digest, and it tells such states apart (the ranks' agreement compares them)."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    state = {"buffers": dict(model.named_buffers()), "count": torch.tensor(7, dtype=torch.int64)}
    assert state["buffers"]["1.num_batches_tracked"].dim() == 0
    other = {**state, "count": torch.tensor(8, dtype=torch.int64)}
    assert state_digest(state) == state_digest({**state, "count": torch.tensor(7, dtype=torch.int64)})
    assert state_digest(state) != state_digest(other)
    assert state_digest(torch.tensor(1.5)) != state_digest(torch.tensor([1.5]))  # the shape counts too


def refused_open_worker(rank, world, x, y, directory):
    def trained():
        trainer = DistributedPCMUTrainer(_model(), torch.nn.functional.cross_entropy, (x, y), **OPTIONS)
        trainer.train(epochs=1)
        return PCMUUnlearner(trainer)
    ledger = DistributedLedger(trained(), directory)
    ledger.forget(FIRST if rank == 0 else None)
    ledger.close()
    # A fresh unlearner (it never saw the request): rank 0 restores the request's state into it, rank 1
    # loads that state and then refuses it, so the opening is refused.
    fresh = trained()
    before = state_digest(fresh.state_dict())
    if rank == 1:
        load, refusals = fresh.load_state_dict, []

        def load_then_refuse(state):  # rank 0's state, once (its own state back is taken)
            load(state)
            if not refusals:
                refusals.append(1)
                raise ValueError("injected: loaded, then refused")
        fresh.load_state_dict = load_then_refuse
    refused = _attempt(lambda: DistributedLedger(fresh, directory))[0]
    unchanged = state_digest(fresh.state_dict()) == before
    reopened = DistributedLedger(fresh, directory)  # (the directory's lock was released)
    requests = len(reopened.requests)
    reopened.close()
    return refused, unchanged, requests


def test_a_refused_opening_leaves_every_ranks_unlearner_as_it_was():
    """Rank 0 restores the ledger's state into its unlearner, another rank cannot take it: the opening
    is refused on every rank, and every rank's unlearner holds its state from before the opening (rank
    0's not the restored one, the refusing rank's not the one it loaded), so the ranks still agree."""
    x, y, _, _ = digits_data()
    with tempfile.TemporaryDirectory() as job_dir:
        got = launch(refused_open_worker, 2, TIMEOUT_S, x, y, job_dir)
    for rank, (refused, unchanged, _) in enumerate(got):
        assert refused == ("DistributedRefusal: rank(s) [1] could not load rank 0's state: rank 1: "
                           "ValueError: injected: loaded, then refused"), (rank, refused)
        assert unchanged, rank
    assert got[0][2] == 1


def unready_worker(rank, world, x, y, directory):
    trainer = DistributedPCMUTrainer(_model(), torch.nn.functional.cross_entropy, (x, y), **OPTIONS)
    trainer.train(epochs=1)
    ledger = DistributedLedger(PCMUUnlearner(trainer), directory)
    before = state_digest(ledger.unlearner.state_dict())
    out = {}
    if rank == 0:  # the directory turns read-only under the open ledger (os.access: a chmod binds no root)
        access = os.access
        os.access = lambda path, mode, **kw: False if mode & os.W_OK and path == directory else access(path, mode, **kw)
    out["unwritable"] = _attempt(lambda: ledger.forget(SECOND))
    if rank == 0:
        os.access = access
    ledger.close()
    out["closed"] = _attempt(lambda: ledger.forget(SECOND))
    out["unchanged"] = state_digest(ledger.unlearner.state_dict()) == before
    return out


def test_a_ledger_rank_0_cannot_commit_to_refuses_the_request_on_every_rank_at_once():
    """A request rank 0's ledger cannot take (its directory is not writable, it was closed) is refused
    on every rank before any work, naming why: no rank answers it and then waits for rank 0 until
    the group's timeout."""
    x, y, _, _ = digits_data()
    with tempfile.TemporaryDirectory() as job_dir:
        got = launch(unready_worker, 2, TIMEOUT_S, x, y, job_dir)
    for rank, out in enumerate(got):
        for case, why in (("unwritable", "is not writable"), ("closed", "was closed")):
            message, seconds = out[case]
            assert message.startswith("DistributedRefusal: rank(s) [0]") and why in message, (rank, case, message)
            assert seconds < GROUP_TIMEOUT_S / 2, (rank, case, seconds)
        assert out["unchanged"], rank
