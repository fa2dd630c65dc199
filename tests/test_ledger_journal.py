"""The ledger's commit journal on its own: records read back as written; a file cut inside its last
record (a torn append, or one the file system left as NUL bytes) gives the whole records before it
and says where they end; every flipped bit of a whole record is refused naming the record; a failed
append leaves the file as it was."""
import os

import pytest

from unlearn_ext import ledger_journal
from unlearn_ext.ledger_journal import Appender, JournalDamaged

RECORDS = [{"version": 2, "request": {"ids": [17], "status": "certified"}, "set": {"inline": {"f": "AAAA"}}},
           {"version": 3, "request": None, "set": {}, "drop": {"parts": ["x"]}},
           {"version": 4, "request": {"ids": [1, 2], "reason": "a\nb \u00e9"}}]


def _journal(tmp_path, records=RECORDS):
    path = str(tmp_path / "journal-000001.log")
    ledger_journal.create(path)
    journal = Appender(path, 0)
    for record in records:
        journal.append(ledger_journal.encode(record))
    journal.close()
    return path


def test_records_read_back_as_written(tmp_path):
    path = _journal(tmp_path)
    records, end, size = ledger_journal.read(path)
    assert records == RECORDS and end == size == os.path.getsize(path)
    assert ledger_journal.read(_journal(tmp_path / "", []))[0] == []


def test_a_cut_inside_the_last_record_is_a_torn_tail(tmp_path):
    path = _journal(tmp_path)
    with open(path, "rb") as f:
        blob = f.read()
    last = len(ledger_journal.encode(RECORDS[-1]))
    whole = len(blob) - last
    for cut in range(whole, len(blob)):  # every length that ends inside the last record
        with open(path, "wb") as f:
            f.write(blob[:cut])
        records, end, size = ledger_journal.read(path)
        assert records == RECORDS[:-1] and end == whole and size == cut


@pytest.mark.parametrize("zeros", [1, 90, 4096])
def test_nul_bytes_after_the_records_or_inside_the_last_one_are_a_torn_tail(tmp_path, zeros):
    """A crash can leave the file extended by an append whose data never reached the disk: NULs
    after the last whole record, or after a part of the one being appended. Both are torn tails."""
    path = _journal(tmp_path)
    with open(path, "rb") as f:
        blob = f.read()
    whole = len(blob) - len(ledger_journal.encode(RECORDS[-1]))
    for cut in range(whole, len(blob) + 1):  # the last record: none of it, part of it, all of it
        with open(path, "wb") as f:
            f.write(blob[:cut] + b"\0" * zeros)
        records, end, size = ledger_journal.read(path)
        kept = RECORDS if cut == len(blob) else RECORDS[:-1]
        assert records == kept and end == (cut if cut == len(blob) else whole) and size == cut + zeros


def test_every_flipped_bit_of_a_whole_record_is_refused_naming_it(tmp_path):
    path = _journal(tmp_path)
    with open(path, "rb") as f:
        blob = f.read()
    starts = [0]
    for record in RECORDS[:-1]:
        starts.append(starts[-1] + len(ledger_journal.encode(record)))
    for position in range(len(blob)):
        damaged = bytearray(blob)
        damaged[position] ^= 1 << (position % 8)
        with open(path, "wb") as f:
            f.write(damaged)
        number = sum(start <= position for start in starts)
        with pytest.raises(JournalDamaged, match=rf"^record {number} \(byte {starts[number - 1]}\)"):
            ledger_journal.read(path)


def test_a_failed_append_leaves_the_journal_as_it_was(tmp_path, monkeypatch):
    path = _journal(tmp_path)
    size = os.path.getsize(path)
    journal = Appender(path, size)
    real_write = os.write

    def half_then_fail(fd, data):  # the disk fills up halfway through the record
        real_write(fd, bytes(data[:len(data) // 2]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        journal.append(ledger_journal.encode({"version": 5, "request": None}))
    monkeypatch.undo()
    assert journal.intact and os.path.getsize(path) == size == journal.size
    journal.append(ledger_journal.encode({"version": 5, "request": None}))
    journal.close()
    assert ledger_journal.read(path)[0] == RECORDS + [{"version": 5, "request": None}]


def test_a_failed_append_that_cannot_be_undone_refuses_further_appends(tmp_path, monkeypatch):
    path = _journal(tmp_path)
    journal = Appender(path, os.path.getsize(path))

    def fail(*args):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", fail)
    monkeypatch.setattr(os, "ftruncate", fail)
    with pytest.raises(OSError, match="Input/output"):
        journal.append(ledger_journal.encode({"version": 5, "request": None}))
    monkeypatch.undo()
    assert not journal.intact
    with pytest.raises(RuntimeError, match="could not be restored"):
        journal.append(ledger_journal.encode({"version": 5, "request": None}))
    journal.close()
