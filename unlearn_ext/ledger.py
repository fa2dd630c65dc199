"""The deletion ledger: every request to any `Unlearner`, durably, with its answer (docs/design.md
§2 and §10).

    ledger = ue.DeletionLedger(unlearner, "deletions/")   # opens or creates; restores after a restart
    report = ledger.forget([17, 42])                      # an UnlearnReport, committed before return

Id hygiene is the Unlearner's (unknown ids named and nothing recorded, duplicates once, repeats
reported, 'already-forgotten' requests recorded too). The ledger adds:

  * Durability: a request takes effect only once committed. The unlearner's state is split into
    parts (weights, records, forgotten ids...); a commit writes a new file only for each part whose
    content changed (a certified PCMU deletion writes the forgotten ids, not the weights), then
    appends one record to the commit journal that `ledger.json` names (ledger_journal.py): what
    the commit changed (the request, the parts' new files or inline values), checksummed, made
    durable by one fsync; then removes files no longer referenced. Now and then (when the journal
    outgrows max(FOLD_BYTES, the snapshot)) a commit folds instead: a fresh empty journal, then
    `ledger.json` replaced atomically (write, fsync, rename, fsync the directory) by the full
    state naming it, then the old journal removed. A crash at any point leaves the previous
    ledger and every file it names intact; an append cut short by a crash (a torn tail: that
    commit never returned) is dropped on reopening, with a warning naming the journal.
  * Cost of a request: what it changed, not the history's length. A part is compared bit for bit
    with the value the ledger last committed (kept in memory; a part that shares memory with it
    counts as changed), so unchanged parts are neither serialized nor hashed. A method's history
    (PCMU's step records) is a `StepLog` (`Unlearner.logs()`): stored in files of LOG_CHUNK entries,
    and a commit rewrites only the chunks from the log's first changed entry on; its rollback undoes
    only what the request changed. Parts of at most INLINE_BYTES serialized live inside
    `ledger.json` or the journal itself ("inline", base64), so a certified deletion is one
    journal record and one fsync, whatever the history's length or the number of requests.
  * No half-applied requests: if anything fails — the method itself partway (an exception in the
    loss during a repair, a refused non-finite result) or the commit (full disk, read-only
    directory) — the unlearner (weights, buffers, counters, forgotten ids) is restored to its state
    before the request and the error is raised, so a retry starts from the same place and gives
    what an uninterrupted request gives. A directory that cannot be written is refused before any
    work is done.
  * Restart: opening a directory that holds a ledger restores the unlearner to the ledger's state
    (build the same unlearner — model, data, configuration — and pass it). State of another method
    or configuration is refused, naming the fields that differ. Files load with
    torch.load(weights_only=True): loading never runs code.
  * Integrity: `ledger.json` carries a sha256 of its own content, each journal record its own
    checksums, and both a sha256 per part file; reopening checks every one before anything is
    loaded, so a damaged ledger (a flipped bit, a truncated snapshot or part, a missing file) is
    refused with one `LedgerCorruptError` naming `ledger.json` (and the journal record, when that
    is the damaged one), and an intact one gives exactly the committed state. A journal cut short
    (or ending in NUL bytes: extended, its data never written) is read as the crash it looks like
    (a torn tail is dropped, with a warning; whole records cut off cannot be told from never
    written). Part and journal files no ledger names (left by a
    crash between a commit's steps) are removed on reopening.
  * One writer: the directory is locked (fcntl) while a ledger is open; a second process gets a
    clear error instead of interleaving commits.
"""
from __future__ import annotations

import base64
import fcntl
import hashlib
import io
import json
import os
import re
import struct

import logging

import numpy as np
import torch

from . import ledger_journal
from .durable import atomic_write
from .step_log import StepLog
from .unlearner import Unlearner, UnlearnReport, fingerprint_differences

logger = logging.getLogger("unlearn_ext")

LEDGER = "ledger.json"
LOCK = "ledger.lock"
# 5: every method's state by parameter name and one fingerprint shape (the Unlearner contract);
# 6: PCMU's step records hold no batch ids (its schedule and "exclusions" part give them);
# 7: commits are records appended to a journal that ledger.json (a snapshot) names;
# 8: PCMU's step records in one encoding (PCMUStep.to_record: "tensors" and "meta"), or named by a
#    "history" part (a mark of the history store holding them) instead of copied: builds before it
#    would load such a state without its records.
# Formats 6 and 7 are read (6 is 7's snapshot without a journal); the first commit after opening one
# folds, writing a format-8 snapshot. A ledger of an earlier format is refused with that reason
# rather than loaded as other state.
FORMAT = "unlearn_ext.ledger/8"
READABLE_FORMATS = (FORMAT, "unlearn_ext.ledger/7", "unlearn_ext.ledger/6")
# A commit folds the journal into a new snapshot once the journal would outgrow both this and the
# snapshot: a fold costs the snapshot's size, so this bounds its share of each commit.
FOLD_BYTES = 1 << 20
# Entries per file of a log part: a commit rewrites the chunks from the first changed entry on, so
# an appended or untouched history costs at most one chunk per request.
LOG_CHUNK = 1024
# Parts this small (serialized) live inside ledger.json, covered by its own checksum: a request that
# changes only them (a certified deletion's forgotten ids) is one atomic write, two fsyncs.
INLINE_BYTES = 4096
CHECKSUM = "ledger_sha256"  # the ledger's own digest: sha256 of its canonical JSON without this key
# The files a ledger writes: '<part>-<version>.pt' (and their '.tmp' while being written).
_PART_FILE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*-\d{6,}\.pt(\.tmp)?$")
# Its journals: 'journal-<version of the snapshot naming it>.log'.
_JOURNAL_FILE = re.compile(r"^journal-\d{6,}\.log$")
# What a journal record updates: the ledger's maps from part to file, digest, inline value, log layout.
_MAPS = ("parts", "digests", "inline", "logs")


class LedgerInUseError(RuntimeError):
    """Another open ledger (in this or another process) holds the directory."""


class LedgerCorruptError(ValueError):
    """The ledger on disk is damaged (a checksum does not match, a file is missing, cut off or
    unreadable): nothing was loaded."""


def state_bytes(value) -> bytes:
    """A state (tensors, containers, numbers, strings) as the bytes the ledger stores it in."""
    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


def state_from_bytes(blob: bytes):
    """The state `state_bytes` wrote, loaded with weights_only=True: loading never runs code."""
    return torch.load(io.BytesIO(blob), weights_only=True)


def _same_content(a, b) -> bool:
    """True only when `a` and `b` certainly hold the same values bit for bit (dtype, shape and
    bytes; 0.0 and -0.0 differ). Anything it cannot be sure of is 'different' (written again):
    tensors sharing memory (a change to one is a change to both, so no comparison can see it),
    unknown types, NaN scalars."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if (a.dtype != b.dtype or a.shape != b.shape or a.device != b.device or a.layout != torch.strided
                or b.layout != torch.strided):
            return False
        if a.numel() == 0:
            return True
        if a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr():
            return False
        x, y = _bytes_of(a), _bytes_of(b)
        if x.device.type == "cpu":  # numpy compares the same integers faster than torch.equal (9 vs 14 us per 16k)
            return bool(np.array_equal(x.numpy(), y.numpy()))
        return torch.equal(x, y)
    if isinstance(a, dict):
        return (isinstance(b, dict) and list(a) == list(b)
                and all(_same_content(a[k], b[k]) for k in a))
    if isinstance(a, (list, tuple)):
        return (type(a) is type(b) and len(a) == len(b)
                and all(_same_content(x, y) for x, y in zip(a, b)))
    if isinstance(a, float):
        return type(b) is float and struct.pack("<d", a) == struct.pack("<d", b)
    if a is None or isinstance(a, (bool, int, str)):
        return type(a) is type(b) and a == b
    return False


def _own_copy(value):
    """A copy of `value` (containers and tensors) that nothing the unlearner holds can change: what
    the ledger keeps as committed. Taken only of parts it writes, which it serializes anyway."""
    if isinstance(value, dict):
        return {k: _own_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_own_copy(v) for v in value)
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    return value


# Integer views of each element size: comparing them is comparing bytes (so 0.0 and -0.0, or two
# NaNs, compare by their bits), and several times faster than comparing uint8 bytes.
_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    """`t`'s elements as integers holding the same bits (bytes when no integer type has their size)."""
    flat = t.detach().contiguous().reshape(-1)
    return flat.view(_SAME_SIZE_INT.get(flat.element_size(), torch.uint8))


def _chunk_part(part: str, c: int) -> str:
    """The ledger part holding chunk c of the log part `part`."""
    return f"{part}__{c:06d}"


def _canonical(ledger: dict) -> bytes:
    """The bytes the ledger's own checksum covers: its JSON, keys sorted, without the checksum."""
    body = {k: v for k, v in ledger.items() if k != CHECKSUM}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), default=float).encode()


class DeletionLedger:
    def __init__(self, unlearner: Unlearner, directory: str):
        self.unlearner, self.directory = unlearner, directory
        # The journal the next commit appends to; None: the next commit folds (writes a snapshot
        # naming a fresh journal). _snapshot_bytes: the size of ledger.json (the fold threshold).
        self._journal, self._snapshot_bytes = None, 0
        # The highest version whose file names a failed commit may have left on disk, named by the
        # disk's ledger (see _commit): later commits never write files of that version again.
        self._spent_version = 0
        # Files such a commit wrote: removed once a later commit has superseded the disk's ledger.
        self._left_behind = set()
        os.makedirs(directory, exist_ok=True)
        self._lock_file = self._lock(directory)
        path = os.path.join(directory, LEDGER)
        try:
            if os.path.exists(path):
                self._restore(path)
                self._remove_unreferenced()
            else:
                self.ledger = {"format": FORMAT, "method": unlearner.method,
                               "fingerprint": unlearner.fingerprint(), "requests": [], "parts": {},
                               "digests": {}, "inline": {}, "logs": {}, "version": 0, "journal": None}
                self._committed = {}
                self._check_writable()
                self._commit(unlearner.state_dict_without_logs())
        except BaseException:
            self.close()
            raise

    # ---- opening --------------------------------------------------------------------------------

    @staticmethod
    def _lock(directory: str):
        f = open(os.path.join(directory, LOCK), "a+b")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise LedgerInUseError(f"the ledger in {directory} is open elsewhere (another process or "
                                   "another DeletionLedger); close it first") from None
        return f

    def _read_verified(self, path: str) -> tuple[dict, dict, tuple[int, int]]:
        """(the ledger, its parts' saved values, (end, size) of its journal's whole records and of
        the file), after checking every checksum; any damage raises LedgerCorruptError naming
        `path`, before anything is loaded into the unlearner."""
        def damaged(what: str) -> LedgerCorruptError:
            return _damaged(path, what)
        ledger, self._snapshot_bytes, journal = _read_ledger(path)
        state = {}
        for part, name in ledger["parts"].items():
            try:
                with open(os.path.join(self.directory, name), "rb") as f:
                    blob = f.read()
            except OSError as exc:
                raise damaged(f"part {part!r} ({name}) cannot be read: {exc.strerror or exc}") from None
            if hashlib.sha256(blob).hexdigest() != ledger["digests"].get(part):
                raise damaged(f"part {part!r} ({name}) does not match the sha256 the ledger recorded for it")
            # The bytes are the ones committed, so this load cannot meet damage.
            state[part] = state_from_bytes(blob)
        for part, text in ledger["inline"].items():
            state[part] = state_from_bytes(base64.b64decode(text))
        for part, meta in ledger.get("logs", {}).items():  # a log part: its chunks, in order
            entries = []
            for c in range(meta["chunks"]):
                chunk = state.pop(_chunk_part(part, c), None)
                if not isinstance(chunk, list):
                    raise damaged(f"log {part!r} lacks its chunk {c}")
                entries += chunk
            if len(entries) != meta["length"]:
                raise damaged(f"log {part!r} holds {len(entries)} entries, the ledger recorded {meta['length']}")
            state[part] = entries
        return ledger, state, journal

    def _restore(self, path: str) -> None:
        ledger, state, (end, size) = self._read_verified(path)
        want = {"method": self.unlearner.method, **self.unlearner.fingerprint()}
        have = {"method": ledger.get("method"), **ledger.get("fingerprint", {})}
        differs = fingerprint_differences(have, want)
        if differs:
            raise ValueError(f"the ledger in {self.directory} belongs to another model or configuration "
                             f"(differs in: {', '.join(differs)})")
        before = self.unlearner.state_dict()
        try:
            self.unlearner.load_state_dict(state)
        except BaseException:
            self.unlearner.load_state_dict(before)  # a refused state leaves the unlearner as it was
            raise
        self.ledger = ledger
        logs = self.unlearner.logs()
        # What the files hold: later commits compare against it (a copy: the unlearner may keep
        # and change the loaded tensors themselves).
        self._committed = {p: _own_copy(v) for p, v in state.items() if p not in logs}
        for part, log in logs.items():
            if part in ledger.get("logs", {}):
                log.mark_clean(self)
        if ledger["journal"] is not None and ledger["format"] == FORMAT:  # else the next commit folds
            self._open_journal(os.path.join(self.directory, ledger["journal"]), end, size)

    def _open_journal(self, path: str, end: int, size: int) -> None:
        """Appends go to `path` from `end` on; a torn tail (end < size: an append a crash cut short,
        whose commit never returned) is cut off first. If the journal cannot be opened for writing,
        the next commit folds into a fresh one (and says why, if it cannot either)."""
        try:
            if end < size:
                logger.warning("ledger: the journal %s ends in a torn record (bytes %d..%d: a commit that a "
                               "crash interrupted, which never returned); it is dropped", path, end, size)
                ledger_journal.cut(path, end)
            self._journal = ledger_journal.Appender(path, end)
        except OSError as error:
            logger.warning("ledger: cannot append to the journal %s (%s); the next commit writes a new one",
                           path, error)
            self._journal = None

    def _remove_unreferenced(self) -> None:
        """Drops part files (and temporaries) and journals that the ledger does not name: a crash
        after a commit's new state was durable but before the files it replaced were removed
        leaves them."""
        keep = set(self.ledger["parts"].values()) | {self.ledger["journal"]}
        for name in os.listdir(self.directory):
            if (_PART_FILE.match(name) or _JOURNAL_FILE.match(name)) and name not in keep:
                _remove(os.path.join(self.directory, name))
        _remove(os.path.join(self.directory, LEDGER + ".tmp"))

    def _check_writable(self) -> None:
        if not os.access(self.directory, os.W_OK):
            raise PermissionError(f"the ledger directory {self.directory} is not writable: no request "
                                  "can be committed (nothing was changed)")

    # ---- requests -------------------------------------------------------------------------------

    @property
    def requests(self) -> list:
        return self.ledger["requests"]

    @property
    def forgotten(self) -> list:
        return self.unlearner.forgotten.tolist()

    def forget(self, ids) -> UnlearnReport:
        """Answers one deletion request through the unlearner and commits it before returning."""
        self._prepare_request()
        logs = self.unlearner.logs()
        before = self.unlearner.state_dict_without_logs()  # a log's snapshot is its clean mark
        try:
            report = self.unlearner.unlearn(ids)  # unknown / empty / malformed requests raise here
            entry = {"request": len(self.requests), **report.to_dict()}
            self._commit(self.unlearner.state_dict_without_logs(), entry)
        except BaseException:
            # The request did not happen: whatever the method changed before failing (weights half
            # repaired, a counter advanced, records replaced) goes back to the snapshot.
            for log in logs.values():
                log.restore_clean()
            self.unlearner.load_state_dict(before)
            raise
        return report

    def _prepare_request(self) -> None:
        """What a request needs before the unlearner runs: the ledger open, its directory writable,
        and what changed outside the ledger since its last commit (e.g. more training) committed,
        so that a rollback returns exactly to the request's starting point. (DistributedLedger's
        rank 0 calls it in the agreement before every rank runs the request: failing later, inside
        forget, it would leave the other ranks in their unlearner's collectives.)"""
        self._check_open()
        self._check_writable()
        if any(log.dirty or log.marked_by is not self for log in self.unlearner.logs().values()):
            self._commit(self.unlearner.state_dict_without_logs())

    def _check_open(self) -> None:
        if self._lock_file is None:
            raise RuntimeError("this DeletionLedger was closed")

    def _commit(self, state: dict, entry: dict | None = None) -> None:
        """Changed parts (of `state`, without logs, and of the unlearner's logs) to new files, then
        one journal record saying so (or, now and then, a fold: a new snapshot), then drop
        replaced files."""
        # Past any version a failed commit may have put on disk: rewriting a file that the disk's
        # ledger names would damage it, should a crash come before this commit's own commit point.
        version = max(self.ledger["version"], self._spent_version) + 1
        staged = {key: dict(self.ledger[key]) for key in _MAPS}
        parts, digests, inline, log_meta = (staged[key] for key in _MAPS)
        committed = dict(self._committed)
        written = []
        # The keys this commit may change in the maps (a dict as an ordered set): the journal
        # record is read from them, not from the whole maps (one entry per log chunk).
        touched = {}
        if entry is not None:  # as a reader parses it (JSON turns tuples into lists...)
            entry = json.loads(json.dumps(entry, default=float))

        def write(part: str, value) -> None:
            touched[part] = None
            blob = state_bytes(value)
            if len(blob) <= INLINE_BYTES:
                inline[part] = base64.b64encode(blob).decode("ascii")
                parts.pop(part, None), digests.pop(part, None)
                return
            inline.pop(part, None)
            digest = hashlib.sha256(blob).hexdigest()
            if digests.get(part) == digest and part in parts:
                return  # unchanged: the file the ledger names already holds it
            name = f"{part}-{version:06d}.pt"
            atomic_write(os.path.join(self.directory, name), lambda f: f.write(blob))
            written.append(name)
            parts[part], digests[part] = name, digest

        logs = self.unlearner.logs()
        record, folding = None, False
        try:
            for part, value in state.items():
                if (part in parts or part in inline) and part in committed and _same_content(committed[part], value):
                    continue  # bit for bit what the ledger's file holds
                write(part, value)
                committed[part] = _own_copy(value)
            for part, log in logs.items():
                self._stage_log(part, log, log_meta, parts, digests, inline, write, touched)
            delta = _delta(self.ledger, staged, version, entry, touched)
            if self._journal is not None and self._journal.intact:
                record = ledger_journal.encode(delta)
                if self._should_fold(len(record)):
                    record = None
            folded = None
            if record is not None:
                self._journal.append(record)
            else:
                folding = True
                folded = self._fold(staged, version, entry)
        except BaseException:
            if folding or (self._journal is not None and not self._journal.intact):
                # The fold's snapshot may have been renamed into place (a failure after the rename),
                # or an appended record could not be cut off again: the disk may name the new files.
                # They stay until the next commit, a fold, has superseded whatever the disk holds
                # with the state in memory (or reopening removes those no ledger names). Its files
                # take a later version (a fold writes the whole ledger: a skipped number is harmless).
                self._spent_version = version
                self._left_behind.update(written)
                if folding:
                    self._left_behind.add(_journal_name(version))
                if self._journal is not None:
                    self._journal.close()
                self._journal = None
            else:
                for name in written:  # not referenced by any ledger: safe to drop
                    _remove(os.path.join(self.directory, name))
            raise
        # The disk now holds the new state: the request happened. What follows must not raise, or
        # the caller would roll memory back to a state the disk no longer holds.
        replaced = set(self.ledger["parts"].values()) - set(parts.values())
        if folded is None:
            _apply(self.ledger, delta)
        else:
            ledger, journal = folded
            replaced.add(self.ledger["journal"])
            replaced |= self._left_behind  # the new snapshot supersedes whatever named them
            self._left_behind = set()
            self._journal, self.ledger = journal, ledger
        self._committed = committed
        for log in logs.values():
            log.mark_clean(self)
        for name in replaced - {None}:
            _remove(os.path.join(self.directory, name))

    def _should_fold(self, record_bytes: int) -> bool:
        """Whether the journal, with a record of `record_bytes` more, outgrew both FOLD_BYTES and the
        snapshot: folding costs the snapshot's size, so at most about one byte per byte appended."""
        return self._journal.size + record_bytes > max(FOLD_BYTES, self._snapshot_bytes)

    def _fold(self, staged: dict, version: int, entry: dict | None) -> tuple[dict, object]:
        """Writes the whole ledger at `version` as a new snapshot naming a new, empty journal:
        the journal first (so the snapshot never names a missing one), then ledger.json replaced
        atomically. Returns (the ledger as a reader parses it, the journal's appender); the old
        journal is the caller's to remove."""
        name = _journal_name(version)
        path = os.path.join(self.directory, name)
        ledger_journal.create(path)
        journal = ledger_journal.Appender(path, 0)
        try:
            ledger = dict(self.ledger, **staged, format=FORMAT, version=version, journal=name,
                          requests=self.requests + ([entry] if entry is not None else []))
            ledger.pop(CHECKSUM, None)
            # Through one JSON round trip, so the checksum covers exactly what a reader parses.
            ledger = json.loads(json.dumps(ledger, default=float))
            ledger[CHECKSUM] = hashlib.sha256(_canonical(ledger)).hexdigest()
            text = json.dumps(ledger, indent=1).encode()
            atomic_write(os.path.join(self.directory, LEDGER), lambda f: f.write(text))
        except BaseException:
            journal.close()
            raise
        if self._journal is not None:
            self._journal.close()
        self._snapshot_bytes = len(text)
        return ledger, journal

    def _stage_log(self, part: str, log: StepLog, log_meta: dict, parts: dict, digests: dict, inline: dict,
                   write, touched: dict) -> None:
        """Writes the chunks of `log` from its first changed entry on (all of them when its marks are
        another committer's); drops chunks past its end."""
        meta = log_meta.get(part)
        ours = meta is not None and log.marked_by is self
        if ours and not log.dirty:
            return
        size = meta["chunk"] if meta is not None else LOG_CHUNK
        first = log.dirty_from // size if ours else 0
        old_chunks = 0 if meta is None else meta["chunks"]
        chunks = -(-len(log) // size)
        for c in range(first, chunks):
            write(_chunk_part(part, c), [e.to_state() for e in log[c * size:(c + 1) * size]])
        for c in range(chunks, old_chunks):
            touched[_chunk_part(part, c)] = None
            for where in (parts, digests, inline):
                where.pop(_chunk_part(part, c), None)
        touched[part] = None
        log_meta[part] = {"length": len(log), "chunk": size, "chunks": chunks}

    # ---- closing --------------------------------------------------------------------------------

    def close(self) -> None:
        """Releases the directory lock (a process that exits releases it too)."""
        if getattr(self, "_journal", None) is not None:
            self._journal.close()
            self._journal = None
        if getattr(self, "_lock_file", None) is not None:
            self._lock_file.close()
            self._lock_file = None

    def __enter__(self) -> "DeletionLedger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()


def read_ledger(directory: str) -> dict:
    """The ledger committed in `directory` as a dict ("requests": every committed request's entry,
    in order; "parts", "inline", "logs": where the state's parts are): ledger.json with its
    journal's records applied, every checksum of both checked (LedgerCorruptError otherwise). Part
    files are not read, nothing is locked or written (a torn journal tail is left out). A writer
    committing meanwhile is no damage: its fold replaces ledger.json before it removes the journal
    the old one named, so a journal gone missing under an updated ledger.json is read again."""
    return _read_ledger(os.path.join(directory, LEDGER))[0]


def _journal_name(version: int) -> str:
    """The journal that the snapshot of `version` names."""
    return f"journal-{version:06d}.log"


def _damaged(path: str, what: str) -> LedgerCorruptError:
    return LedgerCorruptError(f"the deletion ledger {path} is damaged: {what}; nothing was loaded "
                              "(restore the directory from a backup)")


def _read_ledger(path: str) -> tuple[dict, int, tuple[int, int]]:
    """(the ledger: the snapshot at `path` with its journal applied, the snapshot's size, (end,
    size) of the journal's whole records and of the file), every checksum checked."""
    with open(path, "rb") as f:
        text = f.read()
    while True:
        ledger = _parse_snapshot(path, text)
        if ledger["journal"] is None:
            return ledger, len(text), (0, 0)
        name = ledger["journal"]
        try:
            records, end, size = ledger_journal.read(os.path.join(os.path.dirname(path), name))
            break
        except FileNotFoundError as exc:
            # A writer that folded between the two reads has replaced the snapshot, then removed
            # the journal it named: read the new snapshot. Unchanged, the journal is missing.
            with open(path, "rb") as f:
                again = f.read()
            if again == text:
                raise _damaged(path, f"its journal {name} cannot be read: {exc.strerror or exc}") from None
            text = again
        except OSError as exc:
            raise _damaged(path, f"its journal {name} cannot be read: {exc.strerror or exc}") from None
        except ledger_journal.JournalDamaged as exc:
            raise _damaged(path, f"its journal {name}: {exc}") from None
    for i, record in enumerate(records):
        if not _apply(ledger, record):
            raise _damaged(path, f"its journal {name}: record {i + 1} is not the commit that follows version "
                                 f"{ledger['version']}")
    return ledger, len(text), (end, size)


def _parse_snapshot(path: str, text: bytes) -> dict:
    """The snapshot `text` read from `path`, its own checksum checked."""
    try:
        ledger = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _damaged(path, f"it is not valid JSON ({exc})") from None
    if not isinstance(ledger, dict):
        raise _damaged(path, "it does not hold a JSON object")
    if ledger.get("format") not in READABLE_FORMATS:
        raise ValueError(f"{path} is not a deletion ledger of this version (format "
                         f"{ledger.get('format')!r}, expected {FORMAT!r})")
    if ledger.get(CHECKSUM) != hashlib.sha256(_canonical(ledger)).hexdigest():
        raise _damaged(path, "its content does not match its own sha256 (a changed or cut-off record)")
    ledger.setdefault("journal", None)  # format 6: no journal
    return ledger


def _delta(old: dict, staged: dict, version: int, entry: dict | None, touched) -> dict:
    """A commit's journal record: its version, its request's entry (None for a commit of changes
    made outside a request) and what it changes in the ledger's maps: "set" {map: {key: new
    value}}, "drop" {map: [removed keys]} (a few entries per request; the maps themselves hold one
    per part or log chunk, so only the keys in `touched`, the only ones the commit changed, are
    compared)."""
    return {"version": version, "request": entry,
            "set": {key: {k: staged[key][k] for k in touched if k in staged[key] and old[key].get(k) != staged[key][k]}
                    for key in _MAPS},
            "drop": {key: [k for k in touched if k in old[key] and k not in staged[key]] for key in _MAPS}}


def _apply(ledger: dict, record: dict) -> bool:
    """Applies one journal record to the ledger in place; False (and nothing changed) unless it is
    a well-formed record of the commit that follows the ledger's version."""
    try:
        ok = (record["version"] == ledger["version"] + 1 and isinstance(record["request"], (dict, type(None)))
              and all(isinstance(record["set"][key], dict) and isinstance(record["drop"][key], list)
                      for key in _MAPS))
    except (KeyError, TypeError):
        return False
    if not ok:
        return False
    for key in _MAPS:
        ledger[key].update(record["set"][key])
        for k in record["drop"][key]:
            ledger[key].pop(k, None)
    if record["request"] is not None:
        ledger["requests"].append(record["request"])
    ledger["version"] = record["version"]
    return True


def _remove(path: str) -> None:
    """Removes a part file no ledger names, best effort: a file that cannot be removed is left with a
    warning (reopening the ledger removes unnamed part files). It never raises, because after a
    commit an error here would make the caller roll memory back to a state the disk no longer holds,
    and while cleaning up after a failure it would hide that failure."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as error:
        logger.warning("ledger: could not remove %s (%s); it is removed when the ledger is next opened",
                       path, error)
