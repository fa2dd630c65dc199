"""The deletion ledger's commit journal: an append-only file of checksummed records, one per commit,
each what that commit changed in the ledger (docs/design.md §10). A commit is one append and one
fsync, whatever the ledger already holds; the ledger folds the journal into a full snapshot now and
then (ledger.py).

A record is a fixed-width header line, then its JSON payload and a newline (the file stays
readable with a text viewer):

    ULJ1 <payload bytes, 10 digits> <sha256 of the payload, 64 hex> <crc32 of the header so far, 8 hex>\\n
    {"version": 7, ...}\\n

The header's own crc32 means a damaged length can never pass for a shorter file. Reading tells
two things apart:
  * torn tail: the file ends inside its last record (a header or payload cut short), or in NUL
    bytes after it (a file system that had extended the file, but not yet written the data, at the
    crash: XFS, ext4 data=writeback; a record always ends in a newline, so none ends in a NUL). An
    append that a crash interrupted leaves exactly this, and that commit never returned, so the
    record is dropped (`read` reports where the whole records end; the caller truncates there).
  * damage: a whole record (header and payload present) whose magic, header checksum or payload
    sha256 does not match, or a payload that is not a JSON object: refused, naming the record.
A truncation that removes whole records cannot be told from a journal that never held them; a
file system's bit flip never changes a file's length, so it is always seen as damage.
"""
from __future__ import annotations

import hashlib
import json
import os
import zlib

from .durable import fsync_dir

MAGIC = b"ULJ1"
_HEADER_SIZE = len(MAGIC) + 1 + 10 + 1 + 64 + 1 + 8 + 1  # 90 bytes, newline included


class JournalDamaged(ValueError):
    """A whole record of the journal does not match its checksums (the message says which)."""


def encode(payload: dict) -> bytes:
    """One record: the header line and `payload` as compact JSON."""
    body = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=float).encode() + b"\n"
    head = MAGIC + b" %010d %s" % (len(body), hashlib.sha256(body).hexdigest().encode())
    return head + b" %08x\n" % zlib.crc32(head) + body


def read(path: str) -> tuple[list[dict], int, int]:
    """(records, end, size): the payloads of the whole records in order, the byte offset where
    they end, and the file's size (end < size: a torn tail from end on). Raises JournalDamaged
    naming the first damaged whole record, OSError when the file cannot be read."""
    with open(path, "rb") as f:
        data = f.read()
    size = len(data)
    data = data.rstrip(b"\0")  # the NULs of an extension whose data never reached the disk
    records, at = [], 0
    while at < len(data):
        head = data[at:at + _HEADER_SIZE]
        if len(head) < _HEADER_SIZE:
            break  # torn inside the header
        where = f"record {len(records) + 1} (byte {at})"
        if head[:len(MAGIC)] != MAGIC or head[-1:] != b"\n" or head[-10:-9] != b" ":
            raise JournalDamaged(f"{where} does not start with a record header")
        if head[-9:-1] != b"%08x" % zlib.crc32(head[:-10]):  # compared as written ('b' and 'B' differ)
            raise JournalDamaged(f"{where}: its header does not match its crc32")
        try:
            length = int(head[len(MAGIC) + 1:len(MAGIC) + 11])
        except ValueError:  # only if written so: the crc32 matched
            raise JournalDamaged(f"{where} has an unreadable header") from None
        body = data[at + _HEADER_SIZE:at + _HEADER_SIZE + length]
        if len(body) < length:
            break  # torn inside the payload
        if hashlib.sha256(body).hexdigest().encode() != head[len(MAGIC) + 12:len(MAGIC) + 76]:
            raise JournalDamaged(f"{where} does not match its sha256")
        try:
            payload = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:  # only if written so: the sha256 matched
            raise JournalDamaged(f"{where} is not valid JSON ({exc})") from None
        if not isinstance(payload, dict):
            raise JournalDamaged(f"{where} does not hold a JSON object")
        records.append(payload)
        at += _HEADER_SIZE + length
    return records, at, size


def create(path: str) -> None:
    """An empty journal at `path` (replacing any file there), durable: the file and its directory
    entry are fsync'd before this returns."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


class Appender:
    """The open journal a ledger appends to. `append` returns only once the record is durable; if it
    fails, the file is cut back to where it was (so no partial record stays in the middle of the
    journal) and `intact` says whether that worked."""

    def __init__(self, path: str, size: int):
        self.path, self.size, self.intact = path, size, True
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND)

    def append(self, record: bytes) -> None:
        if not self.intact:
            raise RuntimeError(f"the journal {self.path} could not be restored after a failed append")
        try:
            view = memoryview(record)
            while view:  # os.write may write less than asked
                view = view[os.write(self._fd, view):]
            _datasync(self._fd)
        except BaseException:
            try:
                os.ftruncate(self._fd, self.size)
                _datasync(self._fd)
            except OSError:
                self.intact = False  # the ledger folds into a fresh journal before the next append
            raise
        self.size += len(record)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _datasync(fd: int) -> None:
    """The file's data and size on disk (fdatasync where there is one: an append needs no more)."""
    (getattr(os, "fdatasync", None) or os.fsync)(fd)


def cut(path: str, end: int) -> None:
    """Truncates the journal at `path` to its first `end` bytes (dropping a torn tail), durably."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, end)
        _datasync(fd)
    finally:
        os.close(fd)
