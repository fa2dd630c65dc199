"""The ledger under failure, for every method: an exception inside `forget` (in the method's loss,
early and late in the request, or in the commit) leaves memory and disk at the previous state, and
the retry equals an uninterrupted run bit for bit; a damaged ledger (bit flips and truncation of
every file) is refused with one error naming ledger.json, never loaded as different state."""
import os
import re

import pytest
import torch

import unlearn_ext.ledger as ledger_module
from unlearn_ext.ledger import LEDGER, DeletionLedger, LedgerCorruptError

from ledger_methods_setup import METHODS, InjectedFault, Setting, requests_without_timing, same

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

    def failing_write(path, write):
        raise OSError("injected failure while committing")

    monkeypatch.setattr(ledger_module, "atomic_write", failing_write)
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
def test_every_damaged_ledger_is_refused_naming_the_ledger_file(method, tmp_path):
    """Bit flips spread over every file the ledger names, and truncations of each: every reopen
    either refuses with LedgerCorruptError naming ledger.json or (never, here: every byte is
    covered by a checksum) gives exactly the committed state."""
    s = setting(method)
    directory = tmp_path / "ledger"
    with DeletionLedger(s.unlearner(), str(directory)) as ledger:
        ledger.forget(FIRST)
        ledger.forget(SECOND)
        committed = ledger.unlearner.state_dict()
    pristine = disk(directory)
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
        try:
            DeletionLedger(unlearner, str(directory)).close()
        except LedgerCorruptError as exc:
            assert str(directory / LEDGER) in str(exc), str(exc)
            refused += 1
            continue
        assert same(unlearner.state_dict(), committed), f"{how} of {name} at {where} loaded other state"
    assert refused == len(damages)  # every byte is covered by a checksum


def test_unreferenced_part_files_are_removed_on_reopen(tmp_path):
    """A crash after ledger.json was replaced but before the replaced part files were removed
    leaves them behind; reopening removes every part file the ledger does not name."""
    s = setting("topk")
    with DeletionLedger(s.unlearner(), str(tmp_path)) as ledger:
        ledger.forget(FIRST)
        named = set(ledger.ledger["parts"].values())
    stale = ["params-000000.pt", "forgotten-000001.pt", "buffers-000009.pt.tmp", LEDGER + ".tmp"]
    for name in stale:
        (tmp_path / name).write_bytes(b"left by a crash")
    (tmp_path / "notes.txt").write_text("not the ledger's")
    with DeletionLedger(s.unlearner(), str(tmp_path)):
        pass
    left = sorted(n for n in os.listdir(tmp_path) if n not in (LEDGER, "ledger.lock"))
    assert left == sorted(named | {"notes.txt"})


def test_a_flipped_bit_in_the_request_log_is_refused(tmp_path):
    """One bit in ledger.json that turns a forgotten id into another (the log and the forgotten set
    then disagree) is refused, not accepted."""
    s = setting("pcmu")
    with DeletionLedger(s.unlearner(), str(tmp_path)) as ledger:
        ledger.forget([17])
    text = (tmp_path / LEDGER).read_text()
    changed = re.sub(r'("ids": \[\s*)17', r"\g<1>57", text, count=1)  # '1' -> '5': one bit
    assert changed != text
    (tmp_path / LEDGER).write_text(changed)
    with pytest.raises(LedgerCorruptError, match="ledger.json is damaged.*sha256"):
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
    assert ledger_module.FORMAT in text and ledger_module.FORMAT == "unlearn_ext.ledger/6"
    path.write_text(text.replace(ledger_module.FORMAT, old))
    with pytest.raises(ValueError, match=rf"not a deletion ledger of this version \(format '{old}', "
                                         r"expected 'unlearn_ext.ledger/6'\)"):
        DeletionLedger(s.unlearner(), str(tmp_path))
