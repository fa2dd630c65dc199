"""On-disk format of the history store: an append-only file of self-describing, checksummed records.

Layout (little endian), format version 3:

    file   = b"UEHIST03" record*
    record = frame header payload
    frame  = struct "<4sIQIII": b"UERC", len(header), len(payload), crc32(header), crc32(payload),
             crc32 of the 24 frame bytes before it (so a damaged length is detected as such)
    header = UTF-8 JSON: kind "file" (the first record), "step" (one recorded step), "run" (run
             metadata, header only: {"run": {...}}; later run records update earlier keys) or
             "rewind" (header only, fsync'd: {"from_step": t}: the steps >= t recorded before it are
             superseded; the steps after it continue from t);
             "sync": true on records that were fsync'd (everything up to them is durable)
    payload= sections one after the other; header["sections"] lists each as
             [name, [[dtype, numel], ...], nbytes, crc32], its arrays' raw bytes in that order

Nothing is ever unpickled: headers are JSON and arrays are rebuilt with torch.frombuffer from
(dtype, numel) pairs the header lists, so reading a file cannot run code. Each section (one field
of a step, or its batch ids) has its own checksum, so a reader reads and verifies only the
sections it needs (a delta chain of parameters skips the gradients). The first record holds
the store's description (fields, shapes, codecs, block size, keyframe interval), which is what
lets a file refuse to load for another model.

Superseding steps. The file is append-only, so a history rewritten from step t on (PCMU's
fallback retrains from t) appends a "rewind" record and then the new steps t, t+1, ...: a reader
indexes the records in file order and a rewind drops the steps >= t indexed before it, so the steps
a reader sees are either all the old ones (it opened before the rewind was whole) or the new ones
from t on; never a mix. The superseded records stay in the file: `truncate_to(mark)` (a `mark()`
taken before) cuts the file back to them, which is how the deletion ledger undoes a request that
rewrote steps and did not commit. A rewind record or an int32 array makes builds before them refuse
the file with a message (an unknown record kind; an unknown dtype).

Versions: 1 and 2 start with b"UEHIST01" and have a 24-byte frame without its own checksum; 2
added "run" records (and optional per-step "lrs"). 3 checksums the frame and marks fsync'd
records. Versions 1 and 2 still open and are appended to in their own layout (a version-1 file
refuses run records: a version-1 reader would take one for a step). In them the fsync'd records
are inferred: the file record, run records and steps holding a keyframe.

Opening scans frames and headers only (seeking over payloads), which rebuilds the index of record
offsets; reading one step then seeks to its record. Payloads are verified at open only after the
last fsync'd record (the "unsynced tail"); earlier ones are verified section by section when read.

Crash recovery. A crash can cut off the last record or, since the OS writes back unsynced pages
in any order, damage any record of the unsynced tail. The first damaged record there and
everything after it is dropped (a writable open truncates it; a read-only open leaves the file
alone) and store.recovery says how many bytes and whole records that was. Damage before the last
fsync'd record is not a crash: it raises HistoryCorruptError and nothing is truncated;
HistoryFile.open(path, salvage=True) then reads every record before the first bad one (read-only,
every payload verified).

Multi-process contract. One writer per file: a writable open or a creation takes an exclusive
flock (LOCK_EX | LOCK_NB) on the file, held until close; a second writer, in this or another
process, gets HistoryLockedError naming the path. Readers (writable=False) take no lock, never
truncate, and see the records that were whole when they opened (a record being written shows as
a torn tail, reported and left in place). flock does not hold on some network file systems, so
each append also checks that the file is still what this handle last wrote (size, path and the
last frame's bytes) and raises HistoryConflictError otherwise; steps must strictly increase, in
a handle and in the file (open refuses a file whose steps repeat or go backwards).

A file cut off while it was being created (no complete first record) holds no steps: creating a
store at its path replaces it with a warning; opening it says so. A file with a complete first
record, or anything not a history file, is never replaced unless the caller passes overwrite=True.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import struct
import warnings
import zlib
from dataclasses import dataclass, field

import torch

from ..durable import fsync_dir

RECORD_MAGIC = b"UERC"
FRAME_V1 = struct.Struct("<4sIQII")   # versions 1 and 2
FRAME = struct.Struct("<4sIQIII")     # version 3: the v1 frame and its own crc32
FILE_MAGIC_V1 = b"UEHIST01"
FILE_MAGIC = b"UEHIST03"
FORMAT_NAME = "unlearn_ext.history"
FORMAT_VERSION = 3                 # what this build writes
READABLE_VERSIONS = (1, 2, 3)      # what it opens
RECORD_KINDS = ("step", "run", "rewind")  # kinds after the first ("file") record
KEYFRAME = "keyframe"              # codecs.KEYFRAME: a step holding one was fsync'd (versions 1, 2)
CREATION_LIMIT = 1 << 20           # a cut-off creation is never larger than a description record

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
               torch.int8: "int8", torch.uint8: "uint8", torch.int32: "int32", torch.int64: "int64"}
DTYPES = {v: k for k, v in DTYPE_NAMES.items()}

_open_binary = open  # the one place files are opened for reading (tests wrap it to count bytes read)


def jsonable(value) -> bool:
    """Whether a value can go into a header: strict JSON (no NaN or Inf, which other readers refuse)."""
    try:
        json.dumps(value, allow_nan=False)
        return True
    except (TypeError, ValueError):
        return False


class HistoryFormatError(ValueError):
    """The file is not a history file, or was written for another model, codec or layout."""


class HistoryCorruptError(IOError):
    """A record's checksum does not match its bytes, or the records do not form one run."""


class HistoryLockedError(RuntimeError):
    """Another handle (in this or another process) has the file open for writing."""


class HistoryConflictError(RuntimeError):
    """The file changed under a writing handle (another writer appended or replaced it)."""


@dataclass(frozen=True)
class Layout:
    """How a file's records are framed: versions 1-2 (no frame checksum) or 3."""
    magic: bytes
    frame: struct.Struct
    checked: bool

    def pack(self, head_len: int, payload_len: int, head_crc: int, payload_crc: int) -> bytes:
        body = FRAME_V1.pack(RECORD_MAGIC, head_len, payload_len, head_crc, payload_crc)
        return body + struct.pack("<I", zlib.crc32(body)) if self.checked else body

    def unpack(self, frame: bytes):
        """(head_len, payload_len, head_crc, payload_crc), or None for a damaged frame."""
        if len(frame) < self.frame.size or frame[:4] != RECORD_MAGIC:
            return None
        fields = self.frame.unpack(frame)
        if self.checked and zlib.crc32(frame[:FRAME_V1.size]) != fields[5]:
            return None
        return fields[1:5]


LAYOUT_V1 = Layout(FILE_MAGIC_V1, FRAME_V1, False)
LAYOUT_V3 = Layout(FILE_MAGIC, FRAME, True)
LAYOUTS = {FILE_MAGIC_V1: LAYOUT_V1, FILE_MAGIC: LAYOUT_V3}


def layout_for(version: int) -> Layout:
    return LAYOUT_V3 if version >= 3 else LAYOUT_V1


@dataclass
class Recovery:
    """What opening a file found damaged at its end (cut off by a crash): dropped from the index,
    and truncated from the file when it was opened writable (`truncated`)."""
    dropped_bytes: int = 0
    dropped_records: int = 0
    reason: str = ""
    truncated: bool = False


@dataclass
class IndexEntry:
    offset: int          # of the frame
    header: dict
    payload_offset: int
    payload_len: int
    payload_crc: int

    @property
    def end(self) -> int:
        return self.payload_offset + self.payload_len


def synced(header: dict) -> bool:
    """Whether a record was fsync'd when written (everything before it is then durable too)."""
    if "sync" in header:
        return bool(header["sync"])
    return header.get("kind") in ("file", "run") or KEYFRAME in header.get("fields", {}).values()


def _lock(f, path: str) -> None:
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise HistoryLockedError(f"{path} is open for writing by another handle or process (it holds the "
                                 "file's lock): one writer per file. Open it with writable=False to read, "
                                 "or close the other writer first") from None


@dataclass
class HistoryFile:
    path: str
    file_header: dict
    index: list = field(default_factory=list)            # step records
    run_info: dict = field(default_factory=dict)         # run records merged in file order
    recovery: Recovery = field(default_factory=Recovery)
    writable: bool = True
    _f: object = None
    layout: Layout = LAYOUT_V3
    _end: int = 0                # file size as this handle last wrote or verified it
    _last: tuple = (0, b"")      # (offset, frame bytes) of the last record
    _last_step: int | None = None
    _tail_synced: bool = True    # whether the last record was fsync'd (a close then adds no mark)
    _appended: bool = False      # whether this handle wrote records (only then may close add one)
    _ident: tuple = ()           # (st_dev, st_ino): the path must still name this file
    _abspath: str = ""           # for that check, whatever the working directory becomes
    _chain: object = None        # sha256 over every record's frame so far (mark()); None: not computed yet
    _torn: bool = False          # an append of this handle failed: bytes after _end may be its own
    _durable_end: int = 0        # the file is fsync'd up to here (by this handle): mark() syncs the rest

    # ---- writing ---------------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str, file_header: dict, *, overwrite: bool = False) -> "HistoryFile":
        """A new file at path, locked for writing. An existing file is refused (FileExistsError)
        unless overwrite, except one cut off while being created (replaced, with a warning)."""
        f = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+b")  # never truncates by itself
        try:
            _lock(f, path)  # before looking at the content: another creator may be writing it
            size = os.fstat(f.fileno()).st_size
            if size and not overwrite:
                cut = _cut_creation(f, size)
                if cut is None:
                    raise FileExistsError(f"{path} exists (a history store or another file): open it with "
                                          "HistoryStore.open to append, pass overwrite=True to replace it, "
                                          "or remove it")
                warnings.warn(f"{path}: {cut}; creating the store anew at this path", RuntimeWarning,
                              stacklevel=3)
            f.truncate(0)
            header = dict(file_header, format=FORMAT_NAME, version=FORMAT_VERSION, kind="file")
            hf = cls(path, header, _f=f, layout=layout_for(FORMAT_VERSION))
            f.seek(0)
            f.write(hf.layout.magic)
            f.flush()  # the append's check compares the file's size with _end
            hf._end = len(hf.layout.magic)
            hf._ident, hf._abspath = _ident(os.fstat(f.fileno())), os.path.abspath(path)
            hf._append(hf.file_header, [], sync=True, index=False)
            fsync_dir(os.path.dirname(os.path.abspath(path)))  # the new file's name survives a crash too
            return hf
        except BaseException:
            f.close()
            raise

    def append(self, header: dict, sections, *, sync: bool) -> IndexEntry:
        """Appends one step: sections is a list of (name, arrays). Steps must strictly increase."""
        step = int(header["step"])
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(f"{self.path}: steps must strictly increase: got {step} after {self._last_step}")
        entry = self._append(dict(header, kind="step"), sections, sync=sync, index=True)
        self._last_step = step
        return entry

    def append_run(self, info: dict) -> None:
        """Appends run metadata (a header-only record) and merges it into run_info. fsync'd: it is
        rare and a reader of the history cannot interpret the steps without it."""
        if self.file_header.get("version") == 1:
            raise HistoryFormatError(f"{self.path} was written in history format version 1, which has no "
                                     "run metadata records (a version-1 reader would misread one); write "
                                     "a new file to record run metadata")
        self._append({"kind": "run", "run": info}, [], sync=True, index=False)
        self.run_info.update(info)

    def append_rewind(self, step: int) -> None:
        """Supersedes the indexed steps >= `step` (a header-only record, fsync'd so that no step
        appended after it can outlive it in a crash); the next step appended may be `step` again."""
        if self.file_header.get("version") != FORMAT_VERSION:
            raise HistoryFormatError(f"{self.path} was written in history format version "
                                     f"{self.file_header.get('version')}, which has no rewind records; write a "
                                     "new file to rewrite steps")
        self._append({"kind": "rewind", "from_step": int(step)}, [], sync=True, index=False)
        self._rewind_index(int(step))

    def _rewind_index(self, step: int) -> None:
        while self.index and self.index[-1].header["step"] >= step:
            self.index.pop()
        self._last_step = self.index[-1].header["step"] if self.index else None

    def mark(self) -> dict:
        """{"bytes", "digest"}: the file's length and a sha256 over the frames of its records (each
        frame holds the crc32 of its header and payload), so a later `truncate_to` or a reopening
        can check that the file still begins with exactly these records. Costs nothing per record
        appended; the first call after opening reads every frame once. The records it covers are
        fsync'd first: a mark is committed elsewhere (the deletion ledger), durably, and must not
        name records that a power loss could still take from the file."""
        if self.writable and self._durable_end < self._end:
            os.fsync(self._f.fileno())  # _append flushed every record: the OS has them
            self._durable_end = self._end
        if self._chain is None:
            self._chain = _frame_chain(self._f, self.layout, self._end)
        return {"bytes": self._end, "digest": self._chain.hexdigest()}

    def truncate_to(self, mark: dict) -> None:
        """Cuts the file back to `mark` (taken by mark() on this file): the records after it are
        removed, fsync'd. Refused unless the file begins with the marked records (HistoryConflictError).
        The caller reopens the file to index what remains (HistoryStore.rollback does)."""
        if not self.writable:
            raise RuntimeError(f"{self.path} was opened read-only (writable=False): it cannot be truncated")
        end, chain = int(mark["bytes"]), self._marked_chain(mark)
        self._check_unchanged(torn_tail_ok=self._torn)  # a failed append's bytes are cut with the rest
        self._f.truncate(end)
        self._f.flush()
        os.fsync(self._f.fileno())
        self._end, self._chain, self._torn = end, chain, False
        self._durable_end = end  # the fsync above synced what stays, too

    def steps_at(self, mark: dict) -> int:
        """How many steps the file indexes once cut back to `mark` (the rewinds after it undone),
        read from the headers of the records it covers; nothing changes. Refused like truncate_to
        unless the file begins with the marked records, so a caller can check before it cuts."""
        end, entries, pos = int(mark["bytes"]), [], len(self.layout.magic)
        self._marked_chain(mark)
        while pos < end:
            e, why = _read_record(self._f, self.layout, pos, end)
            if e is None:  # the frames' chain matched: the bytes changed under this handle since
                raise HistoryCorruptError(f"{self.path}: {why}")
            entries.append(e)
            pos = e.end
        covered = HistoryFile(self.path, self.file_header, writable=False, layout=self.layout)
        covered._index_records(entries[1:], salvage=False)  # entries[0]: the file description
        return len(covered.index)

    def _marked_chain(self, mark: dict):
        """The frames' chain of the records `mark` covers; HistoryConflictError unless the file
        begins with exactly them."""
        end = int(mark["bytes"])
        chain = _frame_chain(self._f, self.layout, end) if end <= self._end else None
        if chain is None or chain.hexdigest() != mark["digest"]:
            raise HistoryConflictError(f"{self.path} does not begin with the records of the mark (length {end} "
                                       f"bytes, digest {mark['digest']}): it was rewritten since; nothing was cut")
        return chain

    def _append(self, header: dict, sections, *, sync: bool, index: bool):
        meta, blobs, crc = [], [], 0
        for name, arrays in sections:
            section = [_to_bytes(a) for a in arrays]
            section_crc = 0
            for b in section:
                section_crc = zlib.crc32(b, section_crc)
                crc = zlib.crc32(b, crc)
            meta.append([name, [[DTYPE_NAMES[a.dtype], a.numel()] for a in arrays], sum(len(b) for b in section),
                         section_crc])
            blobs += section
        header = dict(header, sections=meta)
        if sync and self.layout.checked:
            header["sync"] = True
        head = json.dumps(header, separators=(",", ":")).encode()
        payload_len = sum(len(b) for b in blobs)
        self._check_unchanged(path_too=sync)
        f, offset = self._f, self._end
        frame = self.layout.pack(len(head), payload_len, zlib.crc32(head), crc)
        try:
            f.seek(offset)
            f.write(frame)
            f.write(head)
            for b in blobs:
                f.write(b)
            f.flush()
            if sync:  # keyframes: a crash after this point loses nothing up to here
                os.fsync(f.fileno())
                self._durable_end = offset + len(frame) + len(head) + payload_len
        except BaseException:
            self._torn = True  # part of the record may be in the file, after _end: truncate_to may cut it
            raise
        entry = IndexEntry(offset, header, offset + len(frame) + len(head), payload_len, crc)
        if self._chain is not None:
            self._chain.update(frame)
        self._end, self._last, self._tail_synced = entry.end, (offset, frame), synced(header)
        self._appended = True
        if index:
            self.index.append(entry)
        return entry

    def _check_unchanged(self, path_too: bool = True, torn_tail_ok: bool = False) -> None:
        """Refuses to append unless the file is exactly what this handle last wrote: another writer
        (lock not honoured, e.g. some network file systems, or the file replaced at its path) would
        otherwise get records of two runs mixed, or deltas against records this handle never saw.
        The path lookup (a file replaced at its path) costs as much as the other checks together:
        it runs before fsync'd records only (at least every keyframe_every records), where it is
        dwarfed by the fsync; records meanwhile went to the replaced file, never into the new one.
        torn_tail_ok: bytes after what this handle last wrote are its own failed append's (truncate_to
        cuts them); the record before them must still be this handle's."""
        fd = self._f.fileno()
        st = os.fstat(fd)
        why = ""
        if st.st_size != self._end and not (torn_tail_ok and st.st_size > self._end):
            why = f"its size is {st.st_size} bytes, this handle last left it at {self._end}"
        elif os.pread(fd, len(self._last[1]), self._last[0]) != self._last[1]:
            why = f"the record at offset {self._last[0]} is not the one this handle wrote"
        elif path_too:
            try:
                if _ident(os.stat(self._abspath)) != self._ident:
                    why = "the path now names another file"
            except FileNotFoundError:
                why = "the file was removed"
        if why:
            raise HistoryConflictError(f"{self.path} changed under this writing handle ({why}): another writer "
                                       "appended to or replaced it. Nothing was written; reopen it with "
                                       "HistoryStore.open to continue from what is on disk")

    def close(self) -> None:
        if self._f is not None:
            if self.writable:
                self._mark_synced()
                self._f.flush()
                os.fsync(self._f.fileno())
            self._f.close()  # releases the lock
            self._f = None

    def _mark_synced(self) -> None:
        """A cleanly closed file ends with an fsync'd record: without it, the records after the last
        keyframe would read as an unsynced tail, and damage there (a flipped bit long after the run)
        would be taken for a crash and truncated with a warning instead of refused. The mark is an
        empty run-metadata record (readers of this format merge it as nothing); version-1 files,
        which have no such records, are only fsync'd. A handle that wrote nothing adds nothing (a
        failed or read-only open must leave the file as it found it)."""
        if not self._appended or self._tail_synced or self.file_header.get("version") == 1:
            return
        try:
            self._append({"kind": "run", "run": {}}, [], sync=True, index=False)
        except HistoryConflictError:
            pass  # another writer replaced the file: nothing of ours to mark

    # ---- reading ---------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str, *, writable: bool = True, salvage: bool = False) -> "HistoryFile":
        """Opens a file: writable takes the writer's lock and truncates a crash-cut tail; salvage
        (always read-only) verifies every payload and keeps every record before the first bad one."""
        writable = writable and not salvage
        f = _open_binary(path, "r+b" if writable else "rb")
        try:
            if writable:
                _lock(f, path)
        except BaseException:
            f.close()
            raise
        return cls._read(f, path, writable=writable, salvage=salvage)

    def reopened(self) -> "HistoryFile":
        """This file indexed afresh from its start (after `truncate_to`), on the same open handle: a
        writer keeps its lock throughout, so no other writer can append in between. This handle is
        spent (the returned one owns the file)."""
        f, self._f = self._f, None
        hf = type(self)._read(f, self.path, writable=self.writable, salvage=False)
        hf._abspath = self._abspath  # `path` may be relative to a working directory left since
        return hf

    @classmethod
    def _read(cls, f, path: str, *, writable: bool, salvage: bool) -> "HistoryFile":
        """Indexes the open file `f` (locked when writable); closes it if that fails."""
        try:
            f.seek(0)
            size = os.fstat(f.fileno()).st_size
            layout = LAYOUTS.get(f.read(len(FILE_MAGIC)))
            if layout is None:
                raise HistoryFormatError(_not_a_store(f, size, path))
            entries, end, recovery = _recover(f, layout, size, path, salvage=salvage)
            if not entries or entries[0].header.get("kind") != "file":
                raise HistoryFormatError(_not_a_store(f, size, path) if _cut_creation(f, size) else
                                         f"{path}: the file description record is missing or damaged "
                                         f"({recovery.reason})")
            file_header = entries[0].header
            if file_header.get("format") != FORMAT_NAME or file_header.get("version") not in READABLE_VERSIONS:
                raise HistoryFormatError(f"{path}: format {file_header.get('format')!r} version "
                                         f"{file_header.get('version')!r}; this build reads {FORMAT_NAME!r} "
                                         f"versions {', '.join(map(str, READABLE_VERSIONS))}")
            hf = cls(path, file_header, writable=writable, _f=f, layout=layout)
            kept = hf._index_records(entries[1:], salvage)
            if kept < len(entries) - 1:  # salvage: records of two runs mixed from entries[kept + 1] on
                end = entries[kept + 1].offset
                recovery = Recovery(size - end, recovery.dropped_records + len(entries) - 1 - kept,
                                    f"step {entries[kept + 1].header.get('step')} does not come after the "
                                    "step before it (records of two writers mixed)")
            hf.recovery = recovery
            last = entries[kept]
            hf._end, hf._last = end, (last.offset, _frame_at(f, layout, last.offset))
            hf._tail_synced = synced(last.header)
            if end < size and writable:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
                hf.recovery.truncated = True
            hf._ident, hf._abspath = _ident(os.fstat(f.fileno())), os.path.abspath(path)
            return hf
        except BaseException:
            f.close()
            raise

    def _index_records(self, records, salvage: bool) -> int:
        """Indexes the records; returns how many it kept (all, unless salvage stopped at steps
        that do not increase, which only two writers appending to one file make)."""
        for n, e in enumerate(records):
            kind = e.header.get("kind")
            if kind not in RECORD_KINDS:
                raise HistoryFormatError(f"{self.path}: record at offset {e.offset} has kind {kind!r}; this "
                                         f"build knows {', '.join(RECORD_KINDS)}")
            if kind == "run":
                self.run_info.update(e.header["run"])
                continue
            if kind == "rewind":
                self._rewind_index(int(e.header["from_step"]))
                continue
            step = e.header.get("step")
            if self._last_step is not None and not step > self._last_step:
                if salvage:
                    return n
                raise HistoryCorruptError(f"{self.path}: step {step} at offset {e.offset} does not come after "
                                          f"step {self._last_step}: records of two writers are mixed in this "
                                          "file. HistoryStore.open(path, salvage=True) reads the records "
                                          "before it")
            self.index.append(e)
            self._last_step = step
        return len(records)

    def _payload_ok(self, e: IndexEntry) -> bool:
        return _payload_ok(self._f, e)

    def read_sections(self, e: IndexEntry, names=None) -> dict:
        """{section name: arrays} of one record, only the named sections (all when None): one seek
        and one read per section, each checksum verified."""
        out, pos = {}, e.payload_offset
        for name, specs, nbytes, crc in e.header["sections"]:
            if names is None or name in names:
                self._f.seek(pos)
                buf = bytearray(self._f.read(nbytes))
                if len(buf) != nbytes or zlib.crc32(buf) != crc:
                    raise HistoryCorruptError(f"{self.path}: record at offset {e.offset} (step "
                                              f"{e.header.get('step')}), section {name!r}: checksum mismatch")
                out[name] = _arrays_from(buf, specs)
            pos += nbytes
        return out


def _ident(st) -> tuple:
    return (st.st_dev, st.st_ino)


def _frame_at(f, layout: Layout, offset: int) -> bytes:
    f.seek(offset)
    return f.read(layout.frame.size)


def _frame_chain(f, layout: Layout, end: int):
    """sha256 over the frames of the records that end exactly at `end` (mark()), or None when no
    record ends there."""
    chain, pos = hashlib.sha256(), len(layout.magic)
    while pos < end:
        frame = os.pread(f.fileno(), layout.frame.size, pos)
        fields = layout.unpack(frame)
        if fields is None:
            return None
        chain.update(frame)
        pos += len(frame) + fields[0] + fields[1]
    return chain if pos == end else None


def _payload_ok(f, e: IndexEntry) -> bool:
    f.seek(e.payload_offset)
    return zlib.crc32(f.read(e.payload_len)) == e.payload_crc


def _arrays_from(buf: bytearray, specs) -> list:
    out, pos = [], 0
    for dtype_name, numel in specs:
        dtype = DTYPES[dtype_name]
        nbytes = numel * dtype.itemsize
        out.append(torch.frombuffer(buf, dtype=dtype, count=numel, offset=pos) if numel
                   else torch.empty(0, dtype=dtype))
        pos += nbytes
    return out


# ---- scanning and recovery ---------------------------------------------------------------------------

def _read_record(f, layout: Layout, pos: int, size: int):
    """(IndexEntry, "") of the whole, well-framed record at pos, or (None, why it is not one).
    The payload is not read."""
    f.seek(pos)
    frame = f.read(layout.frame.size)
    if len(frame) < layout.frame.size:
        return None, f"the frame of the record at offset {pos} is cut off"
    fields = layout.unpack(frame)
    if fields is None:
        if not frame.strip(b"\0"):
            return None, f"zero bytes at offset {pos}, where a record should start"
        return None, f"the frame at offset {pos} is damaged (no record marker, or a frame checksum mismatch)"
    head_len, payload_len, head_crc, payload_crc = fields
    end = pos + len(frame) + head_len + payload_len
    if end > size:
        return None, f"the record at offset {pos} runs past the end of the file"
    head = f.read(head_len)
    if zlib.crc32(head) != head_crc:
        return None, f"record header at offset {pos}: header checksum mismatch"
    try:
        header = json.loads(head)
    except ValueError:  # a matching checksum over bytes that are not JSON: not written by this format
        return None, f"record header at offset {pos} is not JSON"
    return IndexEntry(pos, header, pos + len(frame) + head_len, payload_len, payload_crc), ""


def _records_from(f, layout: Layout, pos: int, size: int) -> list:
    """The whole records found after damage at pos: the next valid frame is searched byte by byte
    (a frame checksum, or in versions 1-2 a header checksum, makes a false find very unlikely),
    then records are followed by their lengths. Used to tell a crash-cut tail from damage."""
    found = []
    while True:
        pos = _find_marker(f, pos + 1, size)
        while pos is not None and pos < size:
            e, _ = _read_record(f, layout, pos, size)
            if e is None:
                break
            found.append(e)
            pos = e.end
        if pos is None or pos >= size:
            return found


def _find_marker(f, pos: int, size: int, chunk: int = 1 << 20):
    while pos < size:
        f.seek(pos)
        buf = f.read(chunk + len(RECORD_MAGIC) - 1)
        i = buf.find(RECORD_MAGIC)
        if i >= 0:
            return pos + i
        pos += chunk
    return None


def _recover(f, layout: Layout, size: int, path: str, *, salvage: bool):
    """(whole records, end of the last, Recovery). Damage in the unsynced tail (after the last
    fsync'd record) is a crash: it and what follows is dropped. Damage with an fsync'd record
    after it raises HistoryCorruptError (salvage: keeps what comes before it)."""
    entries, pos, why = [], len(layout.magic), ""
    while pos < size:
        e, why = _read_record(f, layout, pos, size)
        if e is None:
            break
        entries.append(e)
        pos = e.end
    # The store fsyncs at least every keyframe_every records, so a crash damages no more than that
    # many at the end; it is also the bound where sync marks are inferred (versions 1 and 2).
    interval = int(entries[0].header.get("keyframe_every", 1)) if entries else 1
    later = _records_from(f, layout, pos, size) if pos < size else []
    if entries and not salvage and (any(synced(e.header) for e in later) or len(later) > interval):
        raise HistoryCorruptError(f"{path}: {why}, and {len(later)} whole records follow it (fsync'd ones "
                                  "or more than a crash can damage), so this is damage, not a crash. Nothing "
                                  "was truncated; HistoryStore.open(path, salvage=True) reads the records before it")
    lost = (1 + len(later)) if pos < size else 0
    # Payloads: of the unsynced tail (a crash may have lost any of its pages), or all (salvage).
    last_sync = max((i for i, e in enumerate(entries) if synced(e.header)), default=0)
    first = 1 if salvage else max(last_sync + 1, len(entries) - interval, 1)
    for i in range(first, len(entries)):
        if not _payload_ok(f, entries[i]):
            lost += len(entries) - i
            why = f"the payload checksum of the record at offset {entries[i].offset} does not match"
            pos, entries = entries[i].offset, entries[:i]
            break
    if pos >= size:
        return entries, pos, Recovery()
    return entries, pos, Recovery(size - pos, lost, why + " (cut off by a crash)" if not salvage else why)


def _cut_creation(f, size: int):
    """Why the file is a creation cut short (no complete first record, nothing after it), or None.
    Such a file holds no steps, so replacing it loses nothing; anything else is never replaced."""
    if size > CREATION_LIMIT:
        return None
    f.seek(0)
    data = f.read(size)
    if not data.strip(b"\0"):
        return f"it holds {size} zero bytes and no record (cut off while it was being created)"
    layout = next((lay for magic, lay in LAYOUTS.items() if data[:len(magic)] == magic[:len(data)]), None)
    if layout is None or data.find(RECORD_MAGIC, len(layout.magic) + 1) >= 0:
        return None  # not a history file, or records after the first: a real store
    head = data[len(layout.magic):]
    fields = layout.unpack(head[:layout.frame.size])
    if len(head) >= layout.frame.size and fields is None and head[:layout.frame.size].strip(b"\0"):
        return None  # a damaged frame, not an unwritten one
    if fields is not None and len(head) >= layout.frame.size + fields[0] + fields[1]:
        return None  # a complete first record
    return f"its {size} bytes are a history file cut off while it was being created (no complete first record)"


def _not_a_store(f, size: int, path: str) -> str:
    cut = _cut_creation(f, size)
    if cut:
        return (f"{path}: {cut}. It holds no steps: create the store again at this path "
                "(HistoryStore(..., tier='disk', path=...)), which replaces it")
    return f"{path} is not an unlearn_ext history file (bad magic)"


def _to_bytes(a: torch.Tensor) -> memoryview:
    a = a.detach().reshape(-1).contiguous().cpu()
    if a.dtype in (torch.bfloat16, torch.float16):
        a = a.view(torch.int16)  # numpy has no bfloat16; the bytes are what matters
    return memoryview(a.numpy()).cast("B")
