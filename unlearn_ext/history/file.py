"""On-disk format of the history store: an append-only file of self-describing, checksummed records.

Layout (little endian):

    file   = b"UEHIST01" record*
    record = frame header payload
    frame  = struct "<4sIQII": b"UERC", len(header), len(payload), crc32(header), crc32(payload)
    header = UTF-8 JSON: kind "file" (the first record), "step" (one recorded step) or "run" (run
             metadata, header only: {"run": {...}}; later run records update earlier keys)
    payload= sections one after the other; header["sections"] lists each as
             [name, [[dtype, numel], ...], nbytes, crc32], its arrays' raw bytes in that order

Nothing is ever unpickled: headers are JSON and arrays are rebuilt with torch.frombuffer from
(dtype, numel) pairs the header lists, so reading a file cannot run code. Each section (one field
of a step, or its batch ids) has its own checksum, so a reader reads and verifies only the
sections it needs (a delta chain of parameters skips the gradients). The first record holds
the store's description (fields, shapes, codecs, block size, keyframe interval), which is what
lets a file refuse to load for another model.

Versions: 2 added "run" records (and optional per-step "lrs" in step headers). Version 1 files
(no run records) still open and can be appended to, except for run records: a version-1 reader
would take a run record for a step, so the store refuses to add one to a version-1 file.

Opening scans frames and headers only (seeking over payloads), which rebuilds the index of record
offsets; reading one step then seeks to its record. A crash can leave a cut-off last record: it
is detected (short frame, short header or payload, or a bad checksum on the last record), the
file is truncated back to the last whole record, and what was dropped is reported. A bad
checksum anywhere else is corruption and raises HistoryCorruptError.
"""
from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass, field

import torch

from ..durable import fsync_dir

FILE_MAGIC = b"UEHIST01"
RECORD_MAGIC = b"UERC"
FRAME = struct.Struct("<4sIQII")
FORMAT_NAME = "unlearn_ext.history"
FORMAT_VERSION = 2                 # what this build writes
READABLE_VERSIONS = (1, 2)         # what it opens
RECORD_KINDS = ("step", "run")     # kinds after the first ("file") record

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
               torch.int8: "int8", torch.uint8: "uint8", torch.int64: "int64"}
DTYPES = {v: k for k, v in DTYPE_NAMES.items()}

_open_binary = open  # the one place files are opened (tests wrap it to count bytes read)


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
    """A record's checksum does not match its bytes."""


@dataclass
class Recovery:
    """What opening a file had to drop from its end (a record cut off by a crash)."""
    dropped_bytes: int = 0
    dropped_records: int = 0
    reason: str = ""


@dataclass
class IndexEntry:
    offset: int          # of the frame
    header: dict
    payload_offset: int
    payload_len: int
    payload_crc: int


@dataclass
class HistoryFile:
    path: str
    file_header: dict
    index: list = field(default_factory=list)            # step records
    run_info: dict = field(default_factory=dict)         # run records merged in file order
    recovery: Recovery = field(default_factory=Recovery)
    writable: bool = True
    _f: object = None

    # ---- writing ---------------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str, file_header: dict) -> "HistoryFile":
        if os.path.exists(path) and os.path.getsize(path) > 0:
            raise FileExistsError(f"{path} exists; open it with HistoryStore.open to append, or remove it")
        hf = cls(path, dict(file_header, format=FORMAT_NAME, version=FORMAT_VERSION, kind="file"))
        hf._f = _open_binary(path, "w+b")
        hf._f.write(FILE_MAGIC)
        hf._append(hf.file_header, [], sync=True, index=False)
        fsync_dir(os.path.dirname(os.path.abspath(path)))  # the new file's name survives a crash too
        return hf

    def append(self, header: dict, sections, *, sync: bool) -> IndexEntry:
        """Appends one step: sections is a list of (name, arrays)."""
        return self._append(dict(header, kind="step"), sections, sync=sync, index=True)

    def append_run(self, info: dict) -> None:
        """Appends run metadata (a header-only record) and merges it into run_info. fsync'd: it is
        rare and a reader of the history cannot interpret the steps without it."""
        if self.file_header.get("version") == 1:
            raise HistoryFormatError(f"{self.path} was written in history format version 1, which has no "
                                     "run metadata records (a version-1 reader would misread one); write "
                                     "a new file to record run metadata")
        self._append({"kind": "run", "run": info}, [], sync=True, index=False)
        self.run_info.update(info)

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
        head = json.dumps(header, separators=(",", ":")).encode()
        payload_len = sum(len(b) for b in blobs)
        f = self._f
        f.seek(0, os.SEEK_END)
        offset = f.tell()
        f.write(FRAME.pack(RECORD_MAGIC, len(head), payload_len, zlib.crc32(head), crc))
        f.write(head)
        for b in blobs:
            f.write(b)
        f.flush()
        if sync:  # keyframes: a crash after this point loses nothing up to here
            os.fsync(f.fileno())
        entry = IndexEntry(offset, header, offset + FRAME.size + len(head), payload_len, crc)
        if index:
            self.index.append(entry)
        return entry

    def close(self) -> None:
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self._f = None

    # ---- reading ---------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str, *, writable: bool = True) -> "HistoryFile":
        f = _open_binary(path, "r+b" if writable else "rb")
        try:
            size = os.fstat(f.fileno()).st_size
            if f.read(len(FILE_MAGIC)) != FILE_MAGIC:
                raise HistoryFormatError(f"{path} is not an unlearn_ext history file (bad magic)")
            entries, end, why = _scan(f, len(FILE_MAGIC), size)
            if not entries or entries[0].header.get("kind") != "file":
                raise HistoryFormatError(f"{path}: the file description record is missing or damaged ({why})")
            file_header = entries[0].header
            if file_header.get("format") != FORMAT_NAME or file_header.get("version") not in READABLE_VERSIONS:
                raise HistoryFormatError(f"{path}: format {file_header.get('format')!r} version "
                                         f"{file_header.get('version')!r}; this build reads {FORMAT_NAME!r} "
                                         f"versions {', '.join(map(str, READABLE_VERSIONS))}")
            hf = cls(path, file_header, writable=writable, _f=f)
            records = entries[1:]
            # A zero-filled or half-written tail can pass the header checks: verify the last payload.
            if records and records[-1].header.get("kind") == "step" and not hf._payload_ok(records[-1]):
                end = records.pop().offset
                why = why or "the last record's payload checksum does not match (cut off by a crash)"
            hf._index_records(records)
            if end < size:
                hf.recovery = Recovery(size - end, 1, why)
                if writable:
                    f.truncate(end)
                    f.flush()
                    os.fsync(f.fileno())
            return hf
        except BaseException:
            f.close()
            raise

    def _index_records(self, records) -> None:
        for e in records:
            kind = e.header.get("kind")
            if kind not in RECORD_KINDS:
                raise HistoryFormatError(f"{self.path}: record at offset {e.offset} has kind {kind!r}; this "
                                         f"build knows {', '.join(RECORD_KINDS)}")
            if kind == "run":
                self.run_info.update(e.header["run"])
            else:
                self.index.append(e)

    def _payload_ok(self, e: IndexEntry) -> bool:
        self._f.seek(e.payload_offset)
        return zlib.crc32(self._f.read(e.payload_len)) == e.payload_crc

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


def _arrays_from(buf: bytearray, specs) -> list:
    out, pos = [], 0
    for dtype_name, numel in specs:
        dtype = DTYPES[dtype_name]
        nbytes = numel * dtype.itemsize
        out.append(torch.frombuffer(buf, dtype=dtype, count=numel, offset=pos) if numel
                   else torch.empty(0, dtype=dtype))
        pos += nbytes
    return out


def _scan(f, pos: int, size: int):
    """Index entries of the whole records from pos on, the end of the last one, and why the scan
    stopped early (empty when it reached the end of the file)."""
    entries = []
    while pos < size:
        f.seek(pos)
        frame = f.read(FRAME.size)
        if len(frame) < FRAME.size:
            return entries, pos, "the last record's frame is cut off"
        magic, head_len, payload_len, head_crc, payload_crc = FRAME.unpack(frame)
        end = pos + FRAME.size + head_len + payload_len
        if magic != RECORD_MAGIC:
            f.seek(pos)
            if not f.read(size - pos).strip(b"\0"):  # zeros a crash left where a record was to go
                return entries, pos, "zero bytes after the last record (cut off by a crash)"
            raise HistoryCorruptError(f"{f.name}: no record marker at offset {pos} (file damaged)")
        head = f.read(head_len)
        if len(head) < head_len or end > size:
            return entries, pos, "the last record is cut off"
        if zlib.crc32(head) != head_crc:
            if end == size:  # the last record: a crash can leave its header half-written (zero pages)
                return entries, pos, "the last record's header checksum does not match (cut off by a crash)"
            raise HistoryCorruptError(f"{f.name}: record header at offset {pos}: checksum mismatch")
        entries.append(IndexEntry(pos, json.loads(head), pos + FRAME.size + head_len, payload_len, payload_crc))
        pos = end
    return entries, pos, ""


def _to_bytes(a: torch.Tensor) -> memoryview:
    a = a.detach().reshape(-1).contiguous().cpu()
    if a.dtype in (torch.bfloat16, torch.float16):
        a = a.view(torch.int16)  # numpy has no bfloat16; the bytes are what matters
    return memoryview(a.numpy()).cast("B")
