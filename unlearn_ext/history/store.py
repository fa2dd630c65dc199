"""Compressed training-history store (docs/design.md §5).

A store records, per step, named tensor lists ("fields", e.g. "params" and "grads") each with its
own codec, plus the learning rate and the batch ids (exact int64). Fields declared with
`delta=True` (parameters) are stored as exact fp32 keyframes every `keyframe_every` records of that
field and as closed-loop quantized deltas (int8, int4, nf4, compand8) in between, so any step
decodes from at most one keyframe plus keyframe_every - 1 deltas, and the error never accumulates:
per element it is at most the codec bound of that step's delta (codecs.max_error_fraction times the
delta block's absmax, e.g. scale / 2 for int8/int4, plus 2^-22 absmax) plus half an ulp of the
value (the fp32 add recon + deq). Steps can be recorded
every step or only at chosen steps (anchors): a field simply appears in the steps that recorded it.
Fields with codec "exact" hold 1-D tensors of any length and dtype, stored bit for bit (a record whose
size varies per step: PCMU's packed codes and fragile sets, pcmu/history.py); a step's scalars that
no field holds go in its `meta` (a JSON object, StoredStep.meta).

A history rewritten from a step on (PCMU's fallback) calls `rewind(t)` and records steps t, t+1, ...
again; on disk the superseded records stay until `rollback(mark)` cuts the file back to a `mark()`
(file.py, "Superseding steps"): a reader sees the old steps or the new ones, never a mix.

Tiers: "device" (the recorded tensors' device, e.g. GPU memory), "host" (CPU memory, pinned when
CUDA is available, so copies to the GPU can overlap), "disk" (file.py: append-only,
checksummed, fsync'd at keyframes; reading a step seeks to its records).

Multi-process contract (details in file.py): one writer per file, enforced by an exclusive lock
taken by creation and by HistoryStore.open (writable, the default); a second writer gets
HistoryLockedError naming the path. Readers open with writable=False: no lock, nothing truncated,
only whole records. A crash-cut tail is dropped on open and reported (store.recovery); damage
before the last fsync'd record raises HistoryCorruptError, and open(path, salvage=True) then
reads every record before it.

    store = ue.HistoryStore.for_model(model, params="int8", grads="int8", keyframe_every=50)
    recorder = ue.HistoryRecorder(store, model, optimizer)      # one line: records at every step
    ...
    s = store.read(t)            # StoredStep: s.tensors["params"], s.tensors["grads"], s.lr, s.lrs, s.batch_ids
    for s in store.iter(10, 20): ...
    g = store.encoded(t, "grads")  # EncodedField: g.dot(v), g.axpy_(y, a) on the codes (no fp32 copy)
    store.run_info               # run metadata: param groups' lr/weight decay/momentum, n, ...
    store.bytes_read             # history payload bytes read so far (for unlearning reports)
    store.report()               # bytes, compression ratio, max and RMS error per step
"""
from __future__ import annotations

import bisect
import json
import math
import warnings
from dataclasses import dataclass, field

import torch

from . import codecs as hc
from ..codec_format import check_codec_args
from ..data import as_ids
from ..parameters import trainable
from .file import DTYPE_NAMES, HistoryCorruptError, HistoryFile, HistoryFormatError, Recovery, jsonable

TIERS = ("device", "host", "disk")
IDS = "#batch_ids"  # the section holding a step's batch ids (field names may not start with '#')


@dataclass
class FieldSpec:
    shapes: list                 # one shape (tuple) per tensor of the field
    codec: str = "int8"
    delta: bool = False          # closed-loop deltas between fp32 keyframes (int codecs only)

    def __post_init__(self):
        self.shapes = [tuple(int(d) for d in s) for s in self.shapes]
        if self.codec == hc.EXACT:
            if self.delta or any(s != (-1,) for s in self.shapes):
                raise ValueError("an exact field holds 1-D tensors of any length: give its shapes as (-1,) "
                                 "per tensor, without delta")
        else:
            hc.check_codec(self.codec)
        if self.delta and self.codec not in hc.BITS:
            raise ValueError(f"delta encoding needs a quantized codec ({', '.join(hc.BITS)}), got {self.codec!r} "
                             "(fp codecs store every step directly)")

    def describe(self) -> dict:
        return {"shapes": [list(s) for s in self.shapes], "codec": self.codec, "delta": self.delta}


@dataclass
class StoredStep:
    step: int
    lr: float | None             # the first param group's lr (lrs[0] when lrs was recorded)
    batch_ids: torch.Tensor | None
    tensors: dict                # field name -> list of fp32 tensors shaped like the recorded ones
                                 # (exact fields: the recorded 1-D tensors, their own dtype)
    stats: dict                  # field name -> {"bytes", "raw_bytes", "max_err", "rms_err", "kind", "digest"}
    lrs: list | None = None      # every param group's lr, when recorded (HistoryRecorder does)
    meta: dict | None = None     # the step's own scalars, when recorded (record(meta=...))


@dataclass
class _Entry:
    """What the store keeps per recorded step: encoded fields (memory tiers) or a file index entry."""
    step: int
    lr: float | None
    stats: dict
    lrs: list | None = None
    fields: dict = field(default_factory=dict)    # name -> hc.Encoded (memory tiers)
    batch_ids: torch.Tensor | None = None
    file_entry: object = None                     # file.IndexEntry (disk tier)
    meta: dict | None = None


class HistoryStore:
    def __init__(self, fields: dict, *, tier: str = "host", path: str | None = None,
                 keyframe_every: int = 50, block_size: int = hc.DEFAULT_BLOCK, nonfinite: str = "error",
                 run_info: dict | None = None, overwrite: bool = False, _file: HistoryFile | None = None):
        """overwrite (disk tier): replace an existing file at path; without it an existing store is
        refused (FileExistsError), except a file cut off while it was being created."""
        if tier not in TIERS:
            raise ValueError(f"tier must be one of {TIERS}, got {tier!r}")
        if tier == "disk" and path is None:
            raise ValueError("the disk tier needs a path")
        if keyframe_every < 1:
            raise ValueError(f"keyframe_every must be >= 1, got {keyframe_every}")
        if nonfinite not in ("error", "skip"):
            raise ValueError(f"nonfinite must be 'error' or 'skip', got {nonfinite!r}")
        check_codec_args(8, block_size)
        if any(str(k).startswith("#") for k in fields):
            raise ValueError("field names may not start with '#' (reserved for the file format)")
        self.fields = {k: (v if isinstance(v, FieldSpec) else FieldSpec(**v)) for k, v in fields.items()}
        self.tier, self.keyframe_every, self.block_size, self.nonfinite = tier, keyframe_every, block_size, nonfinite
        self.skipped_steps: list = []
        self._broken = ""                # why recording stopped (a failed disk write), if it did
        self._entries: list[_Entry] = []
        self._steps: list[int] = []      # the entries' steps (ascending), for bisect
        self._recon: dict = {}           # encoder state per delta field: fp32 reconstruction
        self._since_key: dict = {}       # records of a delta field since its last keyframe
        # Records since the last fsync: also synced every keyframe_every records when no keyframe
        # did, so the tail a crash can damage (and open() may drop) stays that short.
        self._since_sync = 0
        self._cache: dict = {}           # decoder state per delta field: (entry index, tensors, their flat vector)
        self._keyframes: dict = {}       # delta field -> entry indices of its keyframes (ascending)
        self._run_info: dict = {}
        # Payload bytes (encoded fields and batch ids) that read(), iter() and encoded() loaded
        # since the store was made or opened: the "history bytes read" of unlearning reports.
        # Assign 0 to start a new count.
        self.bytes_read = 0
        # Counts the changes to what the store holds (a recorded step, new run metadata): what was
        # computed from the store at one revision (mini/history_digest.py) holds while it is unchanged.
        self.revision = 0
        self.file = _file
        if tier == "disk" and self.file is None:
            self.file = HistoryFile.create(path, self._describe(), overwrite=overwrite)
        if self.file is not None:
            self._run_info = dict(self.file.run_info)
        if run_info:
            self.set_run_info(**run_info)

    # ---- construction --------------------------------------------------------------------------

    @classmethod
    def for_model(cls, model, *, params: str | None = "int8", grads: str | None = "int8",
                  extra: dict | None = None, **kw):
        """A store for a model's trainable parameters: 'params' (closed-loop deltas for int codecs)
        and 'grads'. Pass None to leave a field out.

        extra: more named fields, e.g. Mini-Unlearning's full-data gradient at anchors. Each value
        is a codec (the field is shaped like the trainable parameters and stored plainly), a
        (shapes or tensors, codec) pair, or a FieldSpec:

            HistoryStore.for_model(model, extra={"full_grad": "fp32", "stats": ([(10,)], "fp16")})
        """
        shapes = _trainable_shapes(model)
        fields = {}
        if params is not None:
            fields["params"] = FieldSpec(shapes, params, delta=params in hc.BITS)
        if grads is not None:
            fields["grads"] = FieldSpec(shapes, grads)
        for name, how in (extra or {}).items():
            if name in fields:
                raise ValueError(f"extra field {name!r} clashes with a field for_model already makes "
                                 "(pass params=None or grads=None to define it yourself)")
            fields[name] = _extra_spec(name, how, shapes)
        return cls(fields, **kw)

    @classmethod
    def open(cls, path: str, *, expect=None, writable: bool = True, salvage: bool = False) -> "HistoryStore":
        """Reopens a disk store. `expect` (a model or a {name: FieldSpec} dict) makes a file written
        for another model or codec fail with a message.

        writable (default): takes the file's writer lock (HistoryLockedError if another handle has
        it); records damaged by a crash after the last fsync'd record (keyframe) are truncated and
        reported (`store.recovery`, a warning); the encoder state continues from the last keyframe
        and deltas. writable=False: no lock, nothing truncated (a torn tail is reported and left).
        Damage before the last fsync'd record raises HistoryCorruptError; salvage=True (read-only)
        then verifies every record and keeps every one before the first bad one."""
        return cls._over(HistoryFile.open(path, writable=writable, salvage=salvage), expect)

    @classmethod
    def _over(cls, hf: HistoryFile, expect=None) -> "HistoryStore":
        """The store over an opened file (open; rollback's reindexed one)."""
        path, writable = hf.path, hf.writable
        r = hf.recovery
        if r.dropped_bytes:
            done = ("truncated them; the store continues after the last whole record" if r.truncated
                    else "left them in the file (opened read-only)")
            warnings.warn(f"{path}: dropped {r.dropped_bytes} bytes ({r.dropped_records} record"
                          f"{'' if r.dropped_records == 1 else 's'}) at the end, not whole: {r.reason}; "
                          f"{done}", RuntimeWarning, stacklevel=3)
        head = hf.file_header
        fields = {k: FieldSpec(**v) for k, v in head["fields"].items()}
        if expect is not None:
            if isinstance(expect, dict):
                want = expect
            else:  # a model: every field holds its trainable parameters; codecs are the file's own
                shapes = _trainable_shapes(expect)
                want = {k: FieldSpec(shapes, v.codec, v.delta) for k, v in fields.items()}
            _check_compatible(path, fields, {k: (v if isinstance(v, FieldSpec) else FieldSpec(**v))
                                             for k, v in want.items()})
        store = cls(fields, tier="disk", path=path, keyframe_every=head["keyframe_every"],
                    block_size=head["block_size"], _file=hf)
        for e in hf.index:
            h = e.header
            store._entries.append(_Entry(h["step"], h["lr"], h["stats"], h.get("lrs"), file_entry=e,
                                         meta=h.get("meta")))
            store._steps.append(h["step"])
            for name in h["fields"]:
                if store.fields[name].delta:
                    store._since_key[name] = 0 if h["fields"][name] == hc.KEYFRAME else store._since_key[name] + 1
                    if h["fields"][name] == hc.KEYFRAME:
                        store._keyframes.setdefault(name, []).append(len(store._entries) - 1)
        if writable:
            store._rebuild_encoder(path)
        store.bytes_read = 0  # opening is not a read of the history
        return store

    def _rebuild_encoder(self, path) -> None:
        """The delta encoders' reconstructions, for appends: each delta field decoded at its last
        record. A damaged record there (before the last fsync'd one: later ones were verified and
        cut at open) cannot be recorded after; the file is closed and the error says how to read
        the good steps."""
        try:
            for name, spec in self.fields.items():
                if spec.delta and name in self._since_key:
                    last = max(i for i in range(len(self._entries)) if self._field_kind(i, name) is not None)
                    self._recon[name] = self._decode_field(name, last)  # a copy the store owns
        except HistoryCorruptError as exc:
            self.close()
            raise HistoryCorruptError(f"{exc}. It cannot be appended to: recording continues from the "
                                      "last parameters, which this damaged record is part of. Nothing was "
                                      "truncated; HistoryStore.open(path, writable=False) reads every step "
                                      "except those that need this record, salvage=True every step before "
                                      "it") from exc

    @property
    def recovery(self) -> Recovery:
        return self.file.recovery if self.file is not None else Recovery()

    def _describe(self) -> dict:
        return {"fields": {k: v.describe() for k, v in self.fields.items()},
                "keyframe_every": self.keyframe_every, "block_size": self.block_size}

    # ---- run metadata --------------------------------------------------------------------------

    @property
    def run_info(self) -> dict:
        """Run metadata (a copy): what HistoryRecorder records (optimizer, param_groups, lrs,
        weight_decay, momentum, ..., steps_per_epoch, batch_seed, n) plus what set_run_info added."""
        return json.loads(json.dumps(self._run_info))  # a deep copy: nested lists stay the store's

    def set_run_info(self, **info) -> None:
        """Adds or updates run metadata (JSON values: numbers, strings, booleans, None, lists and
        dicts of them). On disk it is appended as its own record, so it can be set at any time;
        later values of a key replace earlier ones."""
        _check_json(info)
        if self.file is not None:
            if not self.file.writable:
                raise RuntimeError(f"{self.file.path} was opened read-only (writable=False): it cannot record")
            self.file.append_run(info)
        self._run_info.update(json.loads(json.dumps(info)))  # stored as it reads back from disk
        self.revision += 1

    # ---- recording -----------------------------------------------------------------------------

    def record(self, step: int, tensors: dict, *, lr: float | None = None, lrs=None,
               batch_ids=None, meta: dict | None = None) -> dict | None:
        """Records the given fields of one step; lrs: every param group's lr (lr defaults to
        lrs[0]); meta: the step's own scalars (JSON values). Returns the step's stats, or None when
        the step was skipped for non-finite values (nonfinite='skip')."""
        step = int(step)
        if meta is not None:
            _check_json(meta, "step meta")
        if self._broken:
            raise RuntimeError(f"this store cannot record any more: {self._broken}. Reopen the file with "
                               "HistoryStore.open, which continues after the last whole record")
        if self.file is not None and not self.file.writable:
            raise RuntimeError(f"{self.file.path} was opened read-only (writable=False): it cannot record")
        if self._entries and step <= self._entries[-1].step:
            raise ValueError(f"steps must increase: got {step} after {self._entries[-1].step}")
        for name, ts in tensors.items():
            if not self._check_field(name, ts, step):
                self.skipped_steps.append(step)
                return None
        lrs = None if lrs is None else [float(x) for x in lrs]
        if lr is None and lrs:
            lr = lrs[0]
        entry = _Entry(step, None if lr is None else float(lr), {}, lrs,
                       meta=None if meta is None else json.loads(json.dumps(meta)))
        if batch_ids is not None:
            entry.batch_ids = as_ids(batch_ids, "batch_ids").to("cpu", copy=True)
        try:
            sync = self._since_sync + 1 >= self.keyframe_every
            for name, ts in tensors.items():
                enc, stats = self._encode(name, list(ts))
                stats["digest"] = hc.payload_digest(enc)
                entry.fields[name] = enc
                entry.stats[name] = stats
                if enc.kind == hc.KEYFRAME:
                    sync = True
                    self._keyframes.setdefault(name, []).append(len(self._entries))
            if self.tier == "disk":
                self._write(entry, sync)
                self._since_sync = 0 if sync else self._since_sync + 1
            else:
                self._to_tier(entry)
        except BaseException as exc:
            # The encoder's reconstruction may already include this step (one field encoded, the
            # next or the write failed): later deltas would be relative to a record the store does
            # not have, so it stops here.
            self._broken = f"writing step {step} failed ({exc!r})"
            raise
        self._entries.append(entry)
        self._steps.append(entry.step)
        self.revision += 1
        return entry.stats

    def _check_field(self, name, ts, step) -> bool:
        if name not in self.fields:
            raise KeyError(f"unknown field {name!r}; this store records {sorted(self.fields)}")
        spec = self.fields[name]
        if len(ts) != len(spec.shapes):
            raise ValueError(f"field {name!r}: got {len(ts)} tensors, the store was made for {len(spec.shapes)}")
        if spec.codec == hc.EXACT:  # stored bit for bit: any length, any dtype the file format knows
            for i, t in enumerate(ts):
                if t.dim() != 1 or t.dtype not in DTYPE_NAMES:
                    raise ValueError(f"field {name!r}[{i}]: an exact field holds 1-D tensors of dtype "
                                     f"{', '.join(DTYPE_NAMES.values())}; got {t.dim()}-D {t.dtype}")
            return True
        for i, (t, s) in enumerate(zip(ts, spec.shapes)):
            if tuple(t.shape) != s:
                raise ValueError(f"field {name!r}[{i}]: shape {tuple(t.shape)}, the store was made for {s}")
            if not t.dtype.is_floating_point:
                raise TypeError(f"field {name!r}[{i}]: dtype {t.dtype} is not floating point")
        # min and max are NaN or +-Inf exactly when a tensor holds one: one vectorized pass per tensor
        # (torch.aminmax), no boolean temporaries, one device-to-host transfer for the whole field.
        nonempty = [i for i, t in enumerate(ts) if t.numel()]
        if not nonempty:
            return True
        ends = torch.stack([torch.stack(torch.aminmax(ts[i])).float() for i in nonempty])
        ok = torch.isfinite(ends).all(dim=1).tolist()
        if all(ok):
            return True
        finite = [True] * len(ts)
        for i, good in zip(nonempty, ok):
            finite[i] = good
        if self.nonfinite == "error":
            raise ValueError(f"step {step}: field {name!r}[{finite.index(False)}] holds NaN or Inf (pass "
                             "nonfinite='skip' to skip such steps)")
        return False

    def _encode(self, name, ts):
        spec = self.fields[name]
        if spec.codec == hc.EXACT:
            enc = hc.encode_exact(ts)
            return enc, {"kind": enc.kind, "bytes": enc.nbytes, "raw_bytes": enc.nbytes, "max_err": 0.0,
                         "rms_err": 0.0}
        raw = sum(t.numel() for t in ts) * 4
        work = [t.detach() if t.dtype in (torch.float32, torch.float16, torch.bfloat16)
                else t.detach().float() for t in ts]
        if spec.delta:
            since = self._since_key.get(name)
            if since is None or since + 1 >= self.keyframe_every:
                enc = hc.encode_keyframe(work, spec.codec)
                self._recon[name] = [t.detach().to(torch.float32, copy=True).contiguous() for t in work]
                self._since_key[name] = 0
                # fp32 holds fp32/fp16/bf16 values exactly: a keyframe has no error to measure.
                return enc, {"kind": enc.kind, "bytes": enc.nbytes, "raw_bytes": raw, "max_err": 0.0,
                             "rms_err": 0.0}
            else:
                recon = self._recon[name]
                if recon and recon[0].device != work[0].device:  # e.g. reopened on CPU, training on GPU
                    recon = self._recon[name] = [r.to(work[0].device) for r in recon]
                enc = hc.encode_delta(work, recon, spec.codec, self.block_size)
                self._since_key[name] = since + 1
            approx = self._recon[name]
        else:
            enc = hc.encode_plain(work, spec.codec, self.block_size)
            approx = [torch.empty(t.shape, dtype=torch.float32, device=t.device) for t in work]
            hc.decode_into(enc, approx, self.block_size)
        max_err, rms_err = hc.error_stats(approx, ts)
        return enc, {"kind": enc.kind, "bytes": enc.nbytes, "raw_bytes": raw, "max_err": max_err,
                     "rms_err": rms_err}

    def _to_tier(self, entry: _Entry) -> None:
        if self.tier == "host":
            pin = torch.cuda.is_available()
            for enc in entry.fields.values():
                enc.arrays = [a.cpu().pin_memory() if pin else a.cpu() for a in enc.arrays]

    def _write(self, entry: _Entry, sync: bool) -> None:
        sections = [(name, enc.arrays) for name, enc in entry.fields.items()]
        if entry.batch_ids is not None:
            sections.append((IDS, [entry.batch_ids]))
        header = {"step": entry.step, "lr": entry.lr, "stats": entry.stats,
                  "fields": {k: enc.kind for k, enc in entry.fields.items()},
                  "batch_ids": entry.batch_ids is not None}
        if entry.lrs is not None:  # absent otherwise, as in files of format version 1
            header["lrs"] = entry.lrs
        if entry.meta is not None:
            header["meta"] = entry.meta
        entry.file_entry = self.file.append(header, sections, sync=sync)
        entry.fields, entry.batch_ids = {}, None  # the disk tier keeps only the index in memory

    def close(self) -> None:
        if self.file is not None:
            self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- rewriting from a step on ----------------------------------------------------------------

    def rewind(self, step: int) -> None:
        """Supersedes the recorded steps >= `step`: the next record may be `step` again. On disk a
        rewind record is appended (fsync'd) and the old records stay in the file until a rollback
        cuts it back; readers that opened before see the old steps, those opening after the new ones.
        Refused for stores with delta-encoded fields (their chain continues from the last record)."""
        step = int(step)
        delta = [k for k, v in self.fields.items() if v.delta]
        if delta:
            raise ValueError(f"rewind: fields {delta} are delta-encoded; a closed-loop chain cannot restart "
                             "mid-chain (record them with a plain codec to rewrite steps)")
        if self.file is not None:
            if not self.file.writable:
                raise RuntimeError(f"{self.file.path} was opened read-only (writable=False): it cannot record")
            self.file.append_rewind(step)
        keep = bisect.bisect_left(self._steps, step)
        del self._entries[keep:], self._steps[keep:]
        self._since_sync = 0
        self._cache.clear()  # decoder state names entries by index: those from `step` on are gone
        self.revision += 1   # what was computed from the superseded steps (a digest) no longer holds

    def mark(self) -> dict:
        """{"bytes", "digest"} of a disk store as it is now (file.py mark()): what `rollback` returns
        to, and what the deletion ledger commits instead of a copy of the records."""
        if self.file is None:
            raise ValueError("mark() and rollback() need a disk store (tier='disk')")
        return self.file.mark()

    def steps_at(self, mark: dict) -> int:
        """How many steps `rollback(mark)` would leave, without changing anything (refused, like it,
        unless the file still begins with the mark's records)."""
        if self.file is None:
            raise ValueError("mark() and rollback() need a disk store (tier='disk')")
        return self.file.steps_at(mark)

    def rollback(self, mark: dict) -> None:
        """Back to `mark`: the file is cut to the records it covered (refused, HistoryConflictError,
        unless the file still begins with them) and reindexed, so rewinds after the mark are undone
        and the steps they superseded read again. The writer keeps its lock throughout: the file is
        reindexed on the same handle."""
        if self.file is None:
            raise ValueError("mark() and rollback() need a disk store (tier='disk')")
        revision, nonfinite, bytes_read = self.revision, self.nonfinite, self.bytes_read
        self.file.truncate_to(mark)
        fresh = HistoryStore._over(self.file.reopened())
        self.__dict__.update(fresh.__dict__)  # in place: its users (a trainer, its records) hold this object
        # What the store holds beside the file (open() gives defaults): its non-finite policy and
        # the bytes its users have read so far.
        self.nonfinite, self.bytes_read = nonfinite, bytes_read
        # Past every revision before: a digest kept from before the rollback must not match again
        # (a fresh store counts from 0, and later records could bring it back to a kept number).
        self.revision = revision + 1

    # ---- reading -------------------------------------------------------------------------------

    @property
    def steps(self) -> list:
        return list(self._steps)

    def __len__(self) -> int:
        return len(self._entries)

    def _index_of(self, step: int) -> int:
        i = bisect.bisect_left(self._steps, step)
        if i == len(self._entries) or self._entries[i].step != step:
            raise KeyError(f"step {step} was not recorded (recorded: {len(self)} steps"
                           + (f", {self._entries[0].step}..{self._entries[-1].step})" if self._entries else ")"))
        return i

    def _load(self, i: int, names=None, ids: bool = False):
        """(fields: name -> Encoded, batch_ids) of entry i, from memory, or from the file reading
        only the named fields (all when None) and the batch ids if asked."""
        e = self._entries[i]
        if e.file_entry is None:
            fields = e.fields if names is None else {n: e.fields[n] for n in names if n in e.fields}
            batch_ids = e.batch_ids if ids or names is None else None
        else:
            h = e.file_entry.header
            want = None if names is None else set(names) | ({IDS} if ids else set())
            sections = self.file.read_sections(e.file_entry, want)
            fields = {name: hc.Encoded(self.fields[name].codec, kind, sections[name])
                      for name, kind in h["fields"].items() if name in sections}
            batch_ids = sections[IDS][0] if IDS in sections else None
        self.bytes_read += sum(enc.nbytes for enc in fields.values())
        if batch_ids is not None:
            self.bytes_read += batch_ids.numel() * batch_ids.element_size()
        return fields, batch_ids

    def _field_kind(self, i: int, name: str):
        e = self._entries[i]
        if e.file_entry is not None:
            return e.file_entry.header["fields"].get(name)
        enc = e.fields.get(name)
        return None if enc is None else enc.kind

    def _decode_field(self, name: str, i: int, device=None, flat: bool = False):
        """The field's tensors (copies the caller owns), or with flat=True one fp32 vector of them
        concatenated in order."""
        spec = self.fields[name]
        if self._field_kind(i, name) is None:
            raise KeyError(f"step {self._entries[i].step} did not record field {name!r}")
        dev = torch.device(device) if device is not None else _CPU
        if spec.codec == hc.EXACT:
            if flat:
                _refuse_exact_flat(name)
            return [a.to(dev, copy=True) for a in self._load(i, [name])[0][name].arrays]
        if not spec.delta:
            if not flat:  # separate tensors: each can be kept or saved without the others' storage
                out = [torch.empty(s, dtype=torch.float32, device=dev) for s in spec.shapes]
                hc.decode_into(self._load(i, [name])[0][name], out, self.block_size)
                return out
            whole, parts = _flat_with_views(spec.shapes, dev)
            hc.decode_into(self._load(i, [name])[0][name], parts, self.block_size)
            return whole
        # Delta chain: from the cached position when it lies between the keyframe and i, else from
        # the last keyframe at or before i. Never more than keyframe_every - 1 deltas. The cache
        # owns its tensors and advances in place; the caller gets one copy (iter() reading steps
        # in order thus costs one delta and one copy per step). The cache is taken out while it
        # advances, so a failed read (a corrupt record) cannot leave it at a wrong position.
        keys = self._keyframes[name]
        key = keys[bisect.bisect_right(keys, i) - 1]
        cached = self._cache.pop(name, None)
        if cached is not None and key <= cached[0] <= i and cached[2].device == dev:
            start, recon, whole = cached
        else:
            start = key
            whole, recon = _flat_with_views(spec.shapes, dev)  # (flat reads copy the vector once)
            hc.decode_into(self._load(key, [name])[0][name], recon, self.block_size)
        names = [name]
        for j in range(start + 1, i + 1):
            if self._field_kind(j, name) == hc.DELTA:
                hc.apply_delta(self._load(j, names)[0][name], recon, self.block_size)
        self._cache[name] = (i, recon, whole)
        return whole.clone() if flat else [t.clone() for t in recon]

    def read(self, step: int, names=None, *, device=None) -> StoredStep:
        """One step's fields (decoded to fp32; `names`: which, default every field, [] none), lr, batch
        ids and stats; reads only what it needs."""
        i = self._index_of(step)
        e = self._entries[i]
        names = [n for n in (self.fields if names is None else names) if self._field_kind(i, n) is not None]
        tensors = {n: self._decode_field(n, i, device) for n in names}
        ids = None
        if e.file_entry is None or e.file_entry.header["batch_ids"]:
            ids = self._load(i, [], ids=True)[1]
            if ids is not None and e.file_entry is None:
                ids = ids.clone()  # memory tiers: the caller must not hold the store's own tensor
        return StoredStep(e.step, e.lr, ids, tensors, e.stats, None if e.lrs is None else list(e.lrs),
                          None if e.meta is None else json.loads(json.dumps(e.meta)))

    def read_flat(self, step: int, name: str) -> torch.Tensor:
        """One field of one step decoded to one fp32 vector, its tensors concatenated in order (what the
        history methods' flat-vector arithmetic reads): no per-tensor copies, no batch ids read."""
        return self._decode_field(name, self._index_of(step), flat=True)

    def read_flat_many(self, steps, name: str) -> torch.Tensor:
        """Field `name` of each of `steps` (increasing) decoded into the rows of one [len(steps), n]
        fp32 matrix: row k holds what read_flat(steps[k], name) gives, bit for bit. For a reader of
        many steps in order (a replay): the codes of every record the rows need are dequantized in
        one call, and a delta chain then advances by one addition per record (its reconstruction
        update: the same rounding, so the same bits) instead of one decode call per step.

        Memory besides the result: a delta field's records are decoded into a scratch matrix of at
        most len(steps) rows (records between wanted steps take further calls, not more rows), plus
        two rows (a record between wanted steps; the decoder cache's copy of the last row)."""
        idx = [self._index_of(s) for s in steps]
        if any(b <= a for a, b in zip(idx, idx[1:])):
            raise ValueError(f"steps must increase, got {list(steps)}")
        spec = self.fields[name]
        if spec.codec == hc.EXACT:
            _refuse_exact_flat(name)
        for i in idx:
            if self._field_kind(i, name) is None:
                raise KeyError(f"step {self._entries[i].step} did not record field {name!r}")
        out = torch.empty(len(idx), sum(math.prod(s) for s in spec.shapes), dtype=torch.float32)
        if not idx:
            return out
        names = [name]
        if not spec.delta:
            hc.decode_many_into([self._load(i, names)[0][name] for i in idx], _row_views(out, spec.shapes),
                                self.block_size)
            return out
        # A delta chain: the first row as read_flat reads it (which places the decoder's cache there),
        # then every record up to the last row, in order: a delta adds its dequantized codes, a
        # keyframe restarts the chain.
        out[0] = self._decode_field(name, idx[0], flat=True)
        span = [(j, self._field_kind(j, name)) for j in range(idx[0] + 1, idx[-1] + 1)]
        span = [(j, kind) for j, kind in span if kind is not None]
        rows, scratch = dict(zip(idx, out)), torch.empty_like(out[0])
        current = out[0]
        per_call = len(idx)  # records decoded per call: as many rows as out has (the scratch's bound)
        for lo in range(0, len(span), per_call):
            part = span[lo:lo + per_call]
            decoded = torch.empty(len(part), out.shape[1], dtype=torch.float32)
            hc.decode_many_into([self._load(j, names)[0][name] for j, _ in part], _row_views(decoded, spec.shapes),
                                self.block_size)
            for (j, kind), values in zip(part, decoded):
                target = rows.get(j, scratch)  # (scratch: a record between two wanted steps, updated in place)
                if kind == hc.DELTA:
                    torch.add(current, values, out=target)
                else:  # a keyframe: its values
                    target.copy_(values)
                current = target
        whole = out[-1].clone()  # the decoder's cache continues from the last row
        self._cache[name] = (idx[-1], _row_views(whole.unsqueeze(0), spec.shapes)[0], whole)
        return out

    def iter(self, start: int | None = None, stop: int | None = None, names=None, *, device=None):
        """StoredSteps of the recorded steps in [start, stop), in order (deltas applied
        incrementally). Each step's tensors are its own: changing them changes no later read."""
        lo = 0 if start is None else bisect.bisect_left(self._steps, start)
        hi = len(self._steps) if stop is None else bisect.bisect_left(self._steps, stop)
        for s in self._steps[lo:hi]:
            yield self.read(s, names, device=device)

    def step_scalars(self):
        """(step, lr, meta) of every recorded step, in order, from the index held in memory: no
        record is read. The meta dicts are the store's own: read them, do not change them."""
        return [(e.step, e.lr, e.meta) for e in self._entries]

    def holds_field(self, step: int, name: str) -> bool:
        """Whether recorded step `step` holds field `name` (from the index: nothing is read)."""
        return self._field_kind(self._index_of(step), name) is not None

    def schedule(self):
        """(step, lr, lrs, batch ids) of every recorded step, in order, without reading any field."""
        for i, e in enumerate(self._entries):
            ids = None
            if e.file_entry is None or e.file_entry.header["batch_ids"]:
                ids = self._load(i, [], ids=True)[1]
            yield e.step, e.lr, None if e.lrs is None else list(e.lrs), ids

    def field_digests(self, names) -> list | None:
        """[(step, [digest of each of `names` the step recorded])] for every recorded step, from the
        digests taken when the steps were recorded (codecs.payload_digest): nothing is read or
        decoded. None when some step has no digest (recorded by a version that did not take them)."""
        out = []
        for e in self._entries:
            stats = [e.stats[n] for n in names if n in e.stats]
            if any("digest" not in s for s in stats):
                return None
            out.append((e.step, [s["digest"] for s in stats]))
        return out

    def encoded(self, step: int, name: str) -> hc.EncodedField:
        """One plain field of one step in its stored form (EncodedField: dot, axpy_, decode,
        nbytes), for products on the codes without an fp32 copy of the field, e.g. DeltaGrad's
        L-BFGS two-loop recursion over the stored gradients.

        Delta-encoded fields (parameters with int codecs) are refused: their codes hold
        w_t - recon_{t-1}, not w_t, and their values exist only after replaying the chain from
        a keyframe, which read() does."""
        if name not in self.fields:
            raise KeyError(f"unknown field {name!r}; this store records {sorted(self.fields)}")
        spec = self.fields[name]
        if spec.codec == hc.EXACT:
            raise ValueError(f"field {name!r} is exact (1-D tensors of any dtype): read it with store.read")
        if spec.delta:
            raise ValueError(f"field {name!r} is delta-encoded (closed-loop deltas between fp32 keyframes): "
                             "its codes are differences from the previous record, not values; use "
                             f"store.read(step, [{name!r}]) for its fp32 values")
        i = self._index_of(step)
        if self._field_kind(i, name) is None:
            raise KeyError(f"step {step} did not record field {name!r}")
        return hc.EncodedField(self._load(i, [name])[0][name], spec.shapes, self.block_size)

    # ---- accounting ----------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Payload bytes of every recorded field (batch ids and file framing not included)."""
        return sum(s["bytes"] for e in self._entries for s in e.stats.values())

    @property
    def raw_nbytes(self) -> int:
        """What the same fields take as fp32."""
        return sum(s["raw_bytes"] for e in self._entries for s in e.stats.values())

    def compression_ratio(self) -> float:
        return self.raw_nbytes / self.nbytes if self.nbytes else float("nan")

    def report(self) -> list:
        """Per recorded step and field: kind, bytes, fp32 bytes, ratio, max and RMS error."""
        return [dict(step=e.step, field=k, ratio=s["raw_bytes"] / s["bytes"] if s["bytes"] else float("nan"), **s)
                for e in self._entries for k, s in e.stats.items()]


_CPU = torch.device("cpu")


def _refuse_exact_flat(name: str) -> None:
    """read_flat / read_flat_many decode fp32 codecs; an exact field holds tensors of any dtype and length."""
    raise ValueError(f"field {name!r} is exact (1-D tensors of any dtype), not a flat fp32 vector")


def _row_views(matrix: torch.Tensor, shapes) -> list:
    """For each row of `matrix` ([k, n], contiguous rows), its views shaped like `shapes` in order:
    a few operations per shape for all the rows, not a split per row."""
    columns, start = [], 0
    for shape in shapes:
        n = math.prod(shape)
        columns.append(matrix[:, start:start + n].view(len(matrix), *shape).unbind(0))
        start += n
    return [list(parts) for parts in zip(*columns)]


def _flat_with_views(shapes, device) -> tuple[torch.Tensor, list]:
    """One fp32 vector for tensors of `shapes` and a view of it shaped like each, in order."""
    sizes = [math.prod(s) for s in shapes]
    whole = torch.empty(sum(sizes), dtype=torch.float32, device=device)
    return whole, [part.view(s) for part, s in zip(whole.split(sizes), shapes)]


def _trainable_shapes(model) -> list:
    return [tuple(p.shape) for p in trainable(model).values()]


def _extra_spec(name: str, how, param_shapes) -> FieldSpec:
    """The FieldSpec of one for_model extra field: a FieldSpec, a codec (shaped like the trainable
    parameters) or a (shapes or tensors, codec) pair."""
    if isinstance(how, FieldSpec):
        return how
    if isinstance(how, str):
        return FieldSpec(param_shapes, how)
    if isinstance(how, (tuple, list)) and len(how) == 2 and isinstance(how[1], str):
        shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else t for t in how[0]]
        return FieldSpec(shapes, how[1])
    raise TypeError(f"extra field {name!r}: expected a codec, a (shapes or tensors, codec) pair or a "
                    f"FieldSpec, got {type(how).__name__}")


def _check_json(info: dict, what: str = "run metadata") -> None:
    """Run metadata and a step's meta must survive a JSON round trip (the file stores JSON; nothing
    is pickled)."""
    if not isinstance(info, dict):
        raise TypeError(f"{what} must be a dict of JSON values, got a {type(info).__name__}")
    for key, value in info.items():
        if not jsonable(value):
            raise TypeError(f"{what} {key!r} is not JSON-serializable (a {type(value).__name__}); "
                            "store finite numbers, strings, booleans, None, or lists and dicts of them")


def _check_compatible(path, have: dict, want: dict) -> None:
    if set(have) != set(want):
        raise HistoryFormatError(f"{path} records fields {sorted(have)}, expected {sorted(want)}")
    for name, w in want.items():
        h = have[name]
        if len(h.shapes) != len(w.shapes):
            raise HistoryFormatError(f"{path} was written for another model: field {name!r} has "
                                     f"{len(h.shapes)} tensors, this model has {len(w.shapes)}")
        for i, (a, b) in enumerate(zip(h.shapes, w.shapes)):
            if a != b:
                raise HistoryFormatError(f"{path} was written for another model: field {name!r}[{i}] "
                                         f"has shape {a}, this model has {b}")
        if h.codec != w.codec or h.delta != w.delta:
            raise HistoryFormatError(f"{path}: field {name!r} uses codec {h.codec!r} (delta={h.delta}), "
                                     f"expected {w.codec!r} (delta={w.delta})")


