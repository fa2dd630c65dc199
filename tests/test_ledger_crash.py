"""A process killed at any write of a commit: reopening the ledger gives the state before the request
or the state after it, never a mix; a retry from "before" gives "after"; the directory keeps no file
the ledger does not name. Covered: a certified PCMU request (one journal record), a resumed one
(part files, then the record), and commits that fold the journal into a new snapshot. The child
process is killed (os._exit) just before each write, fsync, rename, truncation and removal it
makes while committing, and in the middle of each os.write (a torn append)."""
import os
import shutil

import pytest
import torch

from unlearn_ext.ledger import LEDGER, LOCK, DeletionLedger
from unlearn_ext.pcmu import PCMUUnlearner

from ledger_methods_setup import fail_commit_after_disk, requests_without_timing, same
from pcmu_settings import digits_trainer, synthetic_trainer

KILLED = 77
# The os calls through which a commit changes the disk.
WRITE_CALLS = ("write", "fsync", "fdatasync", "replace", "remove", "ftruncate")


def _certified():
    return PCMUUnlearner(synthetic_trainer().train(steps=20))


def _resumable():
    return PCMUUnlearner(digits_trainer().train(epochs=1))


MANY = list(range(0, 1400, 70))  # 5 ids in each batch of 350: more than M = 3, so training resumes
SCENARIOS = {  # name: (unlearner factory, first request, second request, fold every commit)
    "certified": (_certified, [5], [6], False),
    "resumed": (_resumable, [3], MANY, False),
    "certified, folding": (_certified, [5], [6], True),
    "resumed, folding": (_resumable, [3], MANY, True),
}


def _run_child(directory, make, request, fold, kill_at=None, torn=False, log=None) -> int:
    """Forks a process that opens the ledger and commits `request`, killed at its kill_at-th write
    call (torn: an os.write then writes half its data first); without kill_at it writes the names
    of its write calls to `log`. Returns the child's exit code."""
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        # The parent's OpenMP thread pool does not survive fork (a parallel region hangs in the child
        # when the parent ran torch with several threads): the child runs single-threaded.
        torch.set_num_threads(1)
        try:
            if fold:  # every commit folds
                DeletionLedger._should_fold = lambda ledger, record_bytes: True
            ledger = DeletionLedger(make(), str(directory))
            calls, real = [], {name: getattr(os, name) for name in WRITE_CALLS}

            def hook(name):
                def call(*args):
                    calls.append(name)
                    if len(calls) == kill_at:
                        if torn:
                            real["write"](args[0], bytes(args[1][:len(args[1]) // 2]))
                        os._exit(KILLED)
                    return real[name](*args)
                return call
            for name in WRITE_CALLS:
                setattr(os, name, hook(name))
            ledger.forget(request)
            for name in WRITE_CALLS:
                setattr(os, name, real[name])
            if log is not None:
                with open(log, "w") as f:
                    f.write(" ".join(calls))
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _named_files_only(ledger, directory) -> bool:
    named = set(ledger.ledger["parts"].values()) | {ledger.ledger["journal"], LEDGER, LOCK}
    return set(os.listdir(directory)) == named


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_a_kill_at_any_write_point_leaves_the_state_before_or_after_the_request(scenario, tmp_path):
    make, first, second, fold = SCENARIOS[scenario]
    base = tmp_path / "base"
    with DeletionLedger(make(), str(base)) as ledger:
        ledger.forget(first)
        before = ledger.unlearner.state_dict()
    shutil.copytree(base, tmp_path / "clean")
    with DeletionLedger(make(), str(tmp_path / "clean")) as ledger:
        ledger.forget(second)
        after, after_requests = ledger.unlearner.state_dict(), requests_without_timing(ledger)
    assert not same(before, after)
    assert after_requests[-1]["status"] == ("retrained" if scenario.startswith("resumed") else "certified")

    shutil.copytree(base, tmp_path / "count")
    log = tmp_path / "calls.txt"
    assert _run_child(tmp_path / "count", make, second, fold, log=log) == 0
    calls = log.read_text().split()
    assert "fdatasync" in calls or fold, calls  # a journal append, unless every commit folds
    assert ("replace" in calls) == (fold or scenario.startswith("resumed")), calls  # a snapshot / part files
    if scenario == "certified":  # one append, one fsync: nothing that grows with the ledger
        assert calls == ["write", "fdatasync"], calls
    kills = [(n, False) for n in range(1, len(calls) + 1)] + \
            [(n, True) for n, name in enumerate(calls, 1) if name == "write"]
    outcomes = []
    for n, torn in kills:
        directory = tmp_path / f"kill-{n}-{torn}"
        shutil.copytree(base, directory)
        code = _run_child(directory, make, second, fold, kill_at=n, torn=torn)
        assert code == KILLED, f"the child was not killed at write call {n} ({calls[n - 1]}): exit code {code}"
        where = f"killed at write call {n} ({calls[n - 1]}{', torn' if torn else ''})"
        with DeletionLedger(make(), str(directory)) as ledger:
            if same(ledger.unlearner.state_dict(), after):
                outcomes.append("after")
                assert requests_without_timing(ledger) == after_requests, where
            else:
                outcomes.append("before")
                assert same(ledger.unlearner.state_dict(), before), f"{where}: neither before nor after"
                assert len(ledger.requests) == 1, where
                ledger.forget(second)  # the retry
                assert same(ledger.unlearner.state_dict(), after), where
            assert _named_files_only(ledger, directory), f"{where}: {sorted(os.listdir(directory))}"
        with DeletionLedger(make(), str(directory)) as ledger:
            assert same(ledger.unlearner.state_dict(), after), f"{where}: the reopened ledger differs"
    assert "before" in outcomes and "after" in outcomes, outcomes


@pytest.mark.parametrize("failure", ["the fold's directory fsync", "the append's fsync"])
def test_a_crash_in_the_commit_after_one_that_failed_past_its_write_leaves_an_openable_ledger(
        failure, tmp_path, monkeypatch):
    """A commit can fail after the disk already holds it (the directory fsync after the fold's
    rename; an appended record that cannot be cut off again): the disk's ledger names that commit's
    files. The next commit (another request, a fold) must not write over them: a crash at any of
    its write calls leaves a ledger that opens to the failed request's state (what the disk held)
    or the next one's, and once it returns the directory holds only the files the ledger names."""
    other = list(range(1, 1400, 70))  # resumes training too, to other weights than MANY
    with DeletionLedger(_resumable(), str(tmp_path / "base")) as base:
        base.forget([3])
    states = {}
    for name, request in (("failed", MANY), ("next", other)):
        shutil.copytree(tmp_path / "base", tmp_path / name)
        with DeletionLedger(_resumable(), str(tmp_path / name)) as clean:
            assert clean.forget(request).status == "retrained"
            states[name] = clean.unlearner.state_dict()
    assert not same(states["failed"], states["next"])
    directory = tmp_path / "ledger"
    ledger = DeletionLedger(_resumable(), str(directory))
    ledger.forget([3])
    with monkeypatch.context() as m:
        fail_commit_after_disk(m, "fold" if failure == "the fold's directory fsync" else "append")
        with pytest.raises(OSError, match="injected"):
            ledger.forget(MANY)
    # The retry, with the directory copied before each of its write calls (a crash there).
    crashes, copying, real = [], [], {name: getattr(os, name) for name in WRITE_CALLS}

    def hook(name):
        def call(*args):
            if not copying:  # the copy's own calls are not the commit's
                copying.append(True)
                copy = tmp_path / f"crash-{len(crashes) + 1}"
                shutil.copytree(directory, copy)
                crashes.append((copy, name))
                copying.clear()
            return real[name](*args)
        return call
    with monkeypatch.context() as m:
        for name in WRITE_CALLS:
            m.setattr(os, name, hook(name))
        ledger.forget(other)
    assert same(ledger.unlearner.state_dict(), states["next"]) and len(ledger.requests) == 2
    assert _named_files_only(ledger, directory), sorted(os.listdir(directory))
    ledger.close()
    assert any(name == "replace" for _, name in crashes)  # the retry folded
    outcomes = []
    for copy, name in crashes:
        with DeletionLedger(_resumable(), str(copy)) as reopened:
            state = reopened.unlearner.state_dict()
            which = [which for which in states if same(state, states[which])]
            assert which, f"crash before {name} in {copy.name}: neither the failed request's state nor the next's"
            outcomes += which
            assert len(reopened.requests) == 2, copy.name
    assert set(outcomes) == set(states), outcomes
