"""The ledger under failure, for every method: an exception inside `forget` (in the method's loss,
early and late in the request, or in the commit) leaves memory and disk at the previous state, and
the retry equals an uninterrupted run bit for bit; a damaged ledger (bit flips and truncation of
every file) is refused with one error naming ledger.json, never loaded as different state."""
import os
import re

import pytest
import torch

import unlearn_ext.ledger as ledger_module
from unlearn_ext import ledger_journal
from unlearn_ext.ledger import LEDGER, DeletionLedger, LedgerCorruptError, read_ledger

from unlearn_ext.pcmu import PCMUUnlearner

from ledger_methods_setup import (METHODS, InjectedFault, Setting, fail_commit_after_disk, requests_without_timing,
                                  same)
from pcmu_settings import digits_trainer, synthetic_trainer

FIRST, SECOND = [3, 4], [5, 7, 20]

_SETTINGS: dict = {}


def setting(method) -> Setting:
    if method not in _SETTINGS:
        _SETTINGS[method] = Setting(method)
    return _SETTINGS[method]


def disk(directory) -> dict:
    out = {}
    for name in sorted(os.listdir(directory)):
        if name != "ledger.lock":
            with open(os.path.join(directory, name), "rb") as f:
                out[name] = f.read()
    return out


@pytest.mark.parametrize("method", METHODS)
def test_failure_inside_forget_leaves_everything_as_before_and_the_retry_equals_an_uninterrupted_run(
        method, tmp_path, monkeypatch):
    s = setting(method)
    # The uninterrupted run, and how many loss calls its second request makes.
    with DeletionLedger(s.unlearner(), str(tmp_path / "clean")) as clean:
        clean.forget(FIRST)
        calls = s.loss.calls
        clean.forget(SECOND)
        calls = s.loss.calls - calls
        expected_state, expected_requests = clean.unlearner.state_dict(), requests_without_timing(clean)
    assert calls >= 2  # the faults below land inside the method

    ledger = DeletionLedger(s.unlearner(), str(tmp_path / "faulty"))
    ledger.forget(FIRST)
    state, files = ledger.unlearner.state_dict(), disk(tmp_path / "faulty")
    points = {"first loss call": 1, "last loss call": calls, "a middle loss call": max(1, calls // 2)}
    for where, n in points.items():
        s.loss.fail_at = s.loss.calls + n
        try:
            with pytest.raises(InjectedFault):
                ledger.forget(SECOND)
        finally:
            s.loss.fail_at = None
        assert same(ledger.unlearner.state_dict(), state), f"{method}: memory changed by a failure at the {where}"
        assert disk(tmp_path / "faulty") == files, f"{method}: disk changed by a failure at the {where}"
        assert ledger.forgotten == FIRST and len(ledger.requests) == 1

    def failing_write(*args):
        raise OSError("injected failure while committing")

    # Every write of a commit fails: its part files and its journal record (or a fold's snapshot).
    monkeypatch.setattr(ledger_module, "atomic_write", failing_write)
    monkeypatch.setattr(ledger_module.ledger_journal.Appender, "append", failing_write)
    with pytest.raises(OSError, match="injected failure while committing"):
        ledger.forget(SECOND)
    monkeypatch.undo()
    assert same(ledger.unlearner.state_dict(), state) and disk(tmp_path / "faulty") == files

    ledger.forget(SECOND)  # the retry
    assert same(ledger.unlearner.state_dict(), expected_state)
    assert requests_without_timing(ledger) == expected_requests
    ledger.close()
    with DeletionLedger(s.unlearner(), str(tmp_path / "faulty")) as reopened:
        assert same(reopened.unlearner.state_dict(), expected_state)


def _flip(path, position: int) -> None:
    with open(path, "r+b") as f:
        f.seek(position)
        byte = f.read(1)[0]
        f.seek(position)
        f.write(bytes([byte ^ (1 << (position % 8))]))


def _truncate(path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


@pytest.mark.parametrize("method", ["pcmu", "topk", "deltagrad"])
def test_every_damaged_ledger_is_refused_naming_the_ledger_file(method, tmp_path, caplog):
    """Bit flips spread over every file the ledger names (ledger.json, its journal, its parts), and
    truncations of each. A flip is always refused with LedgerCorruptError naming ledger.json (every
    byte is covered by a checksum), and so is a truncated snapshot or part file. A truncated
    journal is what a crash during an append leaves: it loads exactly the state of an earlier
    commit, never other state, with a warning naming the journal when the cut is inside a record
    (a cut between records cannot be told from a journal that ended there), or, where that
    commit's replaced part files are gone (PCMU's records), is refused."""
    s = setting(method)
    directory = tmp_path / "ledger"
    with DeletionLedger(s.unlearner(), str(directory)) as ledger:
        commits = [ledger.unlearner.state_dict()]
        ledger.forget(FIRST)
        commits.append(ledger.unlearner.state_dict())
        ledger.forget(SECOND)
        commits.append(ledger.unlearner.state_dict())
        journal = ledger.ledger["journal"]
    pristine = disk(directory)
    assert pristine[journal], "the requests left no journal records: the test exercises nothing"
    files = [LEDGER] + sorted(n for n in pristine if n != LEDGER)
    damages = []
    for name in files:
        size = len(pristine[name])
        damages += [(name, "flip", p) for p in sorted({0, size // 7, size // 3, size // 2, size - 40, size - 1})]
        damages += [(name, "truncate", t) for t in sorted({0, size // 2, size - 1})]
    refused = 0
    for name, how, where in damages:
        for n, blob in pristine.items():  # back to the committed files
            with open(directory / n, "wb") as f:
                f.write(blob)
        (_flip if how == "flip" else _truncate)(directory / name, where)
        unlearner = s.unlearner()
        caplog.clear()
        try:
            DeletionLedger(unlearner, str(directory)).close()
        except LedgerCorruptError as exc:
            assert str(directory / LEDGER) in str(exc), str(exc)
            refused += 1
            continue
        assert name == journal and how == "truncate", f"{how} of {name} at {where} was not refused"
        assert any(same(unlearner.state_dict(), c) for c in commits), f"{how} of {name} at {where} loaded other state"
        cut_inside_a_record = where not in _record_ends(pristine[journal])
        assert (journal in caplog.text and "torn" in caplog.text) == cut_inside_a_record, (where, caplog.text)
    journal_cuts = sum(name == journal and how == "truncate" for name, how, _ in damages)
    assert refused >= len(damages) - journal_cuts


def _record_ends(journal: bytes) -> set:
    """Offsets where a whole record of the journal ends (0 included)."""
    ends, at = {0}, 0
    while at < len(journal):
        at += ledger_module.ledger_journal._HEADER_SIZE + int(journal[at + 5:at + 15])
        ends.add(at)
    return ends


def test_unreferenced_part_files_are_removed_on_reopen(tmp_path):
    """A crash after a commit was durable but before the part files (or the journal) it replaced
    were removed leaves them behind; reopening removes every such file the ledger does not name."""
    s = setting("topk")
    with DeletionLedger(s.unlearner(), str(tmp_path)) as ledger:
        ledger.forget(FIRST)
        named = set(ledger.ledger["parts"].values()) | {ledger.ledger["journal"]}
    stale = ["params-000000.pt", "forgotten-000001.pt", "buffers-000009.pt.tmp", LEDGER + ".tmp",
             "journal-000000.log", "journal-1234567.log"]
    for name in stale:
        (tmp_path / name).write_bytes(b"left by a crash")
    (tmp_path / "notes.txt").write_text("not the ledger's")
    with DeletionLedger(s.unlearner(), str(tmp_path)):
        pass
    left = sorted(n for n in os.listdir(tmp_path) if n not in (LEDGER, "ledger.lock"))
    assert left == sorted(named | {"notes.txt"})


def test_a_flipped_bit_in_the_request_log_is_refused(tmp_path):
    """One bit in the request's journal record that turns a forgotten id into another (the log and
    the forgotten set then disagree) is refused, naming the record, not accepted."""
    s = setting("pcmu")
    with DeletionLedger(s.unlearner(), str(tmp_path)) as ledger:
        ledger.forget([17])
        journal = tmp_path / ledger.ledger["journal"]
    text = journal.read_text()
    changed = re.sub(r'("ids":\[)17', r"\g<1>57", text, count=1)  # '1' -> '5': one bit
    assert changed != text
    journal.write_text(changed)
    with pytest.raises(LedgerCorruptError, match=r"ledger.json is damaged: its journal journal-\d+\.log: record 1 "
                                                 r"\(byte 0\) does not match its sha256"):
        DeletionLedger(s.unlearner(), str(tmp_path))


def test_a_replaced_file_that_cannot_be_removed_after_the_commit_keeps_the_request(tmp_path, monkeypatch, caplog):
    """Once ledger.json names the new state the request has happened: a replaced part file that
    cannot be removed (permissions, a busy file system) is left with a warning instead of raising,
    which would roll memory back to a state the disk no longer holds. Reopening removes the file.
    (PCMU: its step records are the part large enough to live in a file of its own.)"""
    s = setting("pcmu")
    with DeletionLedger(s.unlearner(), str(tmp_path / "clean")) as clean:
        clean.forget(FIRST)
        clean.forget(SECOND)
        expected = clean.unlearner.state_dict()

    ledger = DeletionLedger(s.unlearner(), str(tmp_path / "stuck"))
    ledger.forget(FIRST)
    first_files = set(ledger.ledger["parts"].values())
    real_remove = os.remove
    refused = []

    def stuck_remove(path):
        if os.path.basename(path) in first_files:
            refused.append(os.path.basename(path))
            raise PermissionError(13, "injected: permission denied", path)
        real_remove(path)

    monkeypatch.setattr(os, "remove", stuck_remove)
    with caplog.at_level("WARNING", logger="unlearn_ext"):
        ledger.forget(SECOND)
    monkeypatch.undo()
    assert refused, "the second request replaced no part file: the test exercises nothing"
    assert all(name in caplog.text for name in refused)
    assert ledger.forgotten == sorted(FIRST + SECOND) and len(ledger.requests) == 2
    assert same(ledger.unlearner.state_dict(), expected)  # memory kept the committed request
    ledger.close()
    with DeletionLedger(s.unlearner(), str(tmp_path / "stuck")) as reopened:
        assert same(reopened.unlearner.state_dict(), expected)
    assert not set(refused) & set(os.listdir(tmp_path / "stuck"))  # removed on reopen


@pytest.mark.parametrize("method, old", [("topk", "unlearn_ext.ledger/4"),  # before weights by name
                                         ("pcmu", "unlearn_ext.ledger/5")])  # PCMU records with batch ids
def test_a_ledger_of_an_earlier_format_is_refused_naming_the_format(tmp_path, method, old):
    """State layouts change between formats (e.g. weights by name, PCMU records without batch ids):
    an older ledger is refused with its format and the expected one, never loaded into the new
    layout."""
    s = setting(method)
    with DeletionLedger(s.unlearner(), str(tmp_path)) as ledger:
        ledger.forget(FIRST)
    path = tmp_path / LEDGER
    text = path.read_text()
    assert ledger_module.FORMAT in text and ledger_module.FORMAT == "unlearn_ext.ledger/8"
    path.write_text(text.replace(ledger_module.FORMAT, old))
    with pytest.raises(ValueError, match=rf"not a deletion ledger of this version \(format '{old}', "
                                         r"expected 'unlearn_ext.ledger/8'\)"):
        DeletionLedger(s.unlearner(), str(tmp_path))


@pytest.mark.parametrize("where", ["the fold's rename", "the append's fsync"])
def test_a_commit_point_that_fails_after_its_write_keeps_the_ledger_openable(tmp_path, monkeypatch, where):
    """A failure after the commit's write reached the file (the directory fsync after the fold's
    rename; an fsync of the append whose record cannot be cut off again) is reported and rolled
    back in memory, yet the disk may hold the request: its files stay, reopening gives the state
    before or after it (never a damaged ledger), and the next commit (a fold) writes what memory
    holds. (PCMU resuming training: the request writes part files, which the disk may name.)"""
    def unlearner():
        return PCMUUnlearner(digits_trainer().train(epochs=1))
    many = list(range(0, 1400, 70))  # 5 ids per batch of 350, more than M = 3: training resumes
    with DeletionLedger(unlearner(), str(tmp_path / "clean")) as clean:
        clean.forget([3])
        before = clean.unlearner.state_dict()
        assert clean.forget(many).status == "retrained"
        after = clean.unlearner.state_dict()
    for reopen_at_once in (True, False):
        directory = str(tmp_path / f"ledger-{reopen_at_once}")
        ledger = DeletionLedger(unlearner(), directory)
        ledger.forget([3])
        with monkeypatch.context() as m:
            fail_commit_after_disk(m, "fold" if where == "the fold's rename" else "append")
            with pytest.raises(OSError, match="injected"):
                ledger.forget(many)
        assert same(ledger.unlearner.state_dict(), before)
        if reopen_at_once:
            ledger.close()
            with DeletionLedger(unlearner(), directory) as reopened:
                assert same(reopened.unlearner.state_dict(), after)  # the write reached the disk
            continue
        ledger.forget(many)  # the retry folds, superseding what the disk held
        assert same(ledger.unlearner.state_dict(), after) and len(ledger.requests) == 2
        ledger.close()
        with DeletionLedger(unlearner(), directory) as reopened:
            assert same(reopened.unlearner.state_dict(), after) and len(reopened.requests) == 2


def test_a_reader_racing_a_fold_reads_the_new_ledger_and_a_missing_journal_is_still_damage(tmp_path, monkeypatch):
    """read_ledger reads ledger.json, then the journal it names. A writer that folds in between
    replaces ledger.json and removes that journal: the reader reads the new snapshot instead of
    calling an intact ledger damaged. A journal missing while ledger.json stays the same is damage."""
    writer = DeletionLedger(PCMUUnlearner(synthetic_trainer().train(steps=20)), str(tmp_path))
    real_read, folds = ledger_journal.read, []

    def read_after_a_fold(path):  # the reader has read ledger.json; the writer folds now
        if not folds:
            with monkeypatch.context() as m:
                m.setattr(DeletionLedger, "_should_fold", lambda self, record_bytes: True)
                writer.forget([5])
            folds.append(path)
        return real_read(path)
    monkeypatch.setattr(ledger_journal, "read", read_after_a_fold)
    try:
        seen = read_ledger(str(tmp_path))
        assert folds and not os.path.exists(folds[0])  # the race happened: the journal read first is gone
        assert seen["journal"] == writer.ledger["journal"] != os.path.basename(folds[0])
        assert [r["ids"] for r in seen["requests"]] == [[5]]
    finally:
        writer.close()
    os.remove(tmp_path / seen["journal"])
    with pytest.raises(LedgerCorruptError, match=rf"its journal {seen['journal']} cannot be read"):
        read_ledger(str(tmp_path))


def test_a_journal_extended_with_nul_bytes_by_a_crash_opens_as_a_torn_tail(tmp_path, caplog):
    """A crash on a file system that had extended the journal for an append, but not written its
    data, leaves NUL bytes after the last whole record: reopening drops them with the torn-tail
    warning and gives the committed state; the next commit appends after the whole records."""
    def unlearner():
        return PCMUUnlearner(synthetic_trainer().train(steps=20))
    with DeletionLedger(unlearner(), str(tmp_path)) as ledger:
        ledger.forget([5])
        committed, journal = ledger.unlearner.state_dict(), tmp_path / ledger.ledger["journal"]
    size = os.path.getsize(journal)
    with open(journal, "ab") as f:
        f.write(b"\0" * 4096)
    with DeletionLedger(unlearner(), str(tmp_path)) as ledger:
        assert same(ledger.unlearner.state_dict(), committed) and len(ledger.requests) == 1
        assert str(journal) in caplog.text and "torn" in caplog.text
        assert os.path.getsize(journal) == size  # cut back before the next append
        ledger.forget([6])
    assert [r["ids"] for r in read_ledger(str(tmp_path))["requests"]] == [[5], [6]]
