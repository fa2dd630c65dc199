"""PCMU's step records in a history store on disk (docs/design.md §5): `PCMUTrainer(...,
history=path_or_store)`.

Each step is one store record: its tensors (records.PCMUStep.to_record: packed codes, fragile values,
indices, radii) as exact fields, its step size as the record's lr, its scalars as the record's meta;
step 0 and every WEIGHTS_EVERY-th step also hold the weights the step starts from (field "initial":
at step 0 the initial weights), which replaying the codes starts from. So the records are crash-safe
and locked like every history file (history/file.py): one writer, fsync'd every keyframe_every
records, a crash-cut tail dropped on reopening and reported (store.recovery); a step's weights are
part of its record, so a crash keeps or loses both. The store's run metadata holds the trainer's
fingerprint; a trainer built over an existing file with another configuration or model is refused,
naming what differs.

The records live in the file only (`StoreLog`): a check reads the records of the steps it needs,
when it needs them, and the per-step scalars a certified request reads (step size, smallest radius,
applied) come from the store's index, so memory does not hold the records and a certified request
reads none.

Reopening: a trainer built over an existing file restores the recorded steps without reading their
records: the per-step arrays from the store's index, the initial weights from step 0, and the
model's weights w_T from the last stored weights and at most WEIGHTS_EVERY records' codes after
them; it trains on from there. What requests changed besides the records (the forgotten ids) is the
deletion ledger's: a `DeletionLedger` over the trainer's unlearner restores it, and cuts the store
back to the records its last commit covered.

Rewriting from a step t0 (the fallback) appends a rewind record and the new steps (the store's
`rewind`): the file stays append-only, a reader sees the old steps or the new ones, never a mix, and
the deletion ledger commits a `mark()` of the store (length + digest) instead of a copy of the
records, so a request costs what it changed; rolling a failed request back cuts the file to the
mark, and the superseded steps read again.

Why the in-memory `StepLog` stays the default: without a path there is no file to make crash-safe,
and a store in memory would hold the same bytes as the StepLog while the ledger would still have to
copy them. Both hold the same encoding (to_record / to_state).
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from ..history.store import FieldSpec, HistoryStore
from ..unlearner import fingerprint_differences
from .records import RECORD_TENSORS, PCMUStep, check_step_sizes

RUN_KEY = "pcmu"        # run metadata: the trainer's fingerprint
# The field holding w_t, the weights step t starts from, one flat float32 tensor per parameter: step 0
# (the initial weights) and every WEIGHTS_EVERY-th step. Its name in files stays "initial": files
# written before the keyframes hold it at step 0 only, and open as they are.
WEIGHTS = "initial"
# Steps between stored weights: a reopen or a replay rebuilds any w_t from the last stored weights
# and fewer than this many records' codes (about 0.2 ms a step on an 85k-parameter MLP). 256 keeps
# the weights at 1/16 of the records' bytes or less (4 bytes per coordinate, against 256 steps'
# codes of 1/4 byte per coordinate each, and their fragile sets).
WEIGHTS_EVERY = 256
# Records between fsyncs of a store created from a path (exact fields have no keyframes: this is the
# store's keyframe_every, which also bounds the tail a crash can cost).
SYNC_EVERY = 50


def fields(parameters: int) -> dict:
    """The store's fields for a model of `parameters` trainable tensors."""
    exact = {name: FieldSpec([(-1,)], "exact") for name in RECORD_TENSORS}
    return {**exact, WEIGHTS: FieldSpec([(-1,)] * parameters, "exact")}


def open_history(history, trainer) -> HistoryStore:
    """The disk store for `trainer`'s records: `history` a path (created, or opened when it exists)
    or a HistoryStore made with `fields(...)` on the disk tier; refused for another configuration."""
    want = fields(len(trainer.params))
    mine = json.loads(json.dumps(trainer.fingerprint(), default=float))
    opened_here = isinstance(history, (str, os.PathLike))  # closed again here when refused
    if opened_here:
        path = os.fspath(history)
        store = (HistoryStore.open(path, expect=want) if os.path.exists(path)
                 else HistoryStore(want, tier="disk", path=path, keyframe_every=SYNC_EVERY))
    elif isinstance(history, HistoryStore):
        store = history
        if store.tier != "disk" or {k: v.describe() for k, v in store.fields.items()} != {
                k: v.describe() for k, v in want.items()}:
            raise ValueError("history: PCMU records into a disk store made with unlearn_ext.pcmu.history.fields("
                             "len(params)) (tier='disk'), or give a path; the in-memory records are the default")
    else:
        raise TypeError(f"history must be a path or a HistoryStore, got {type(history).__name__}")
    saved = store.run_info.get(RUN_KEY)
    if saved is None and not len(store):
        store.set_run_info(**{RUN_KEY: mine})
    elif saved != mine:
        if opened_here:
            store.close()
        if saved is None:
            raise ValueError(f"history {store.file.path}: holds steps but no PCMU configuration: not a PCMU history")
        differs = fingerprint_differences(saved, mine)
        raise ValueError(f"history {store.file.path} was recorded by another PCMU model or configuration "
                         f"(differs in: {', '.join(differs)})")
    return store


class StoreLog:
    """The trainer's records, read from the disk store when asked (`log[t]`, iteration): memory
    holds none of them, so it does not grow with the recorded steps. Every change is a store
    change: append records a step (step 0 and every WEIGHTS_EVERY-th step with the weights it
    starts from), truncate rewinds the store."""

    def __init__(self, store: HistoryStore, trainer):
        self.store, self.trainer = store, trainer
        # Set when recording a step failed: the model's weights have moved past the records then,
        # so no later step may be recorded until a rollback (reload) restores both.
        self._failed: str | None = None

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._read(t) for t in range(*i.indices(len(self)))]
        t = range(len(self))[i]  # an IndexError out of range, negative indices as a list's
        return self._read(t)

    def __iter__(self):
        for t in range(len(self)):
            yield self._read(t)

    def _read(self, t: int) -> PCMUStep:
        return read_record(self.store, t)

    def append(self, entry: PCMUStep) -> None:
        if self._failed:
            raise RuntimeError(f"history {self.store.file.path}: {self._failed}, and the model's weights moved "
                               "on without it: no later step is recorded. Reopen the trainer over the file, or "
                               "roll back to a saved state")
        try:
            tensors, meta = entry.to_record()
            tensors = {k: [v] for k, v in tensors.items()}
            if entry.step % WEIGHTS_EVERY == 0:
                weights = self.trainer.initial if entry.step == 0 else weights_at(self, entry.step)
                tensors[WEIGHTS] = [w.detach().reshape(-1).to("cpu", torch.float32) for w in weights]
            self.store.record(entry.step, tensors, lr=entry.step_size, meta=meta)
        except BaseException as exc:
            self._failed = f"recording step {entry.step} failed ({exc!r})"
            raise

    def truncate(self, length: int) -> None:
        length = max(int(length), 0)
        if length < len(self):
            self.store.rewind(length)

    def replace(self, entries) -> None:
        """Every record rewritten (load_state_dict, which restores the weights with them)."""
        self._failed = None
        self.truncate(0)
        for e in entries:
            self.append(e)

    def keyframe(self, t: int) -> tuple[int, list[torch.Tensor]]:
        """(s, w_s): the last recorded weights at or before step t (replaying the codes from s
        gives w_t). The weights are stored at step 0 and every WEIGHTS_EVERY-th step, so at most
        that many records lie between (files written before the keyframes hold step 0's only)."""
        s = min(int(t), len(self) - 1)
        while s > 0 and not self.store.holds_field(s, WEIGHTS):
            s -= 1
        return s, stored_weights(self.store, s, self.trainer.params)

    def reload(self) -> None:
        """After the store was rolled back (and the trainer's state restored with it): the records
        are read from the store, so only a failed append's refusal is lifted."""
        self._failed = None


def weights_at(log: StoreLog, t: int) -> list[torch.Tensor]:
    """w_t (0 < t <= len(log)): the last stored weights before it, the codes after them replayed."""
    return log.trainer.replay(t, log.keyframe(t - 1))


def step_scalars(store: HistoryStore) -> tuple:
    """(step sizes, smallest radii, applied) of every recorded step as numpy arrays, from the
    store's index in memory (no record is read); refused unless the steps are 0, 1, ... and each
    holds a PCMU record's scalars."""
    rows = store.step_scalars()
    n = len(rows)
    try:
        if [row[0] for row in rows] != list(range(n)):
            raise ValueError("the steps are not 0, 1, 2, ...")
        sizes = np.fromiter((row[1] for row in rows), np.float64, n)
        radii = np.fromiter((float(row[2]["min_radius"]) for row in rows), np.float64, n)
        applied = np.fromiter((row[2]["applied"] for row in rows), np.bool_, n)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"history {store.file.path}: its step records are not PCMU records "
                         f"({type(exc).__name__}: {exc})") from None
    return sizes, radii, applied


def read_record(store: HistoryStore, t: int) -> PCMUStep:
    """Step t's record, its stored weights not read; refused naming the step unless it is a PCMU record."""
    s = store.read(t, [k for k in RECORD_TENSORS if store.holds_field(t, k)])
    try:
        return PCMUStep.from_record(s.step, s.lr, {k: v[0] for k, v in s.tensors.items()}, s.meta)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"history {store.file.path}: step record {t} is not a PCMU record "
                         f"({type(exc).__name__}: {exc})") from None


def load_records(store: HistoryStore) -> list[PCMUStep]:
    """Every step the store holds, as a list (a trainer reads them one at a time: StoreLog), refused
    unless they are steps 0, 1, ... each with a whole record."""
    if store.steps != list(range(len(store))):
        raise ValueError(f"history {store.file.path}: its steps are not 0, 1, 2, ... (not PCMU records)")
    return [read_record(store, t) for t in range(len(store))]


def stored_weights(store: HistoryStore, step: int, params) -> list[torch.Tensor]:
    """The weights recorded at `step` (w_step: step 0's are the initial weights), shaped like the
    parameters `params` and in their dtype and device: stored as float32, which holds a half-precision
    parameter's values exactly, they are cast back, so a replay from them adds the codes in the
    parameters' own arithmetic, as training did."""
    flat = store.read(step, [WEIGHTS]).tensors.get(WEIGHTS)
    if flat is None or [t.numel() for t in flat] != [p.numel() for p in params] or any(
            t.dtype != torch.float32 for t in flat):
        raise ValueError(f"history {store.file.path}: step {step} does not hold this model's "
                         f"{'initial ' if step == 0 else ''}weights (float32, one tensor per parameter)")
    return [t.reshape(p.shape).to(p.device, p.dtype) for t, p in zip(flat, params)]


def attach(trainer, history) -> None:
    """Makes `trainer` record into `history` (open_history); over a file holding steps, restores
    them: the initial weights, the per-step arrays (from the store's index: no record is read), and
    the model's weights (w_T: the last stored weights and the codes after them replayed). Refused
    before the trainer changes when the steps are not PCMU records or their learning rates are not
    the trainer's."""
    store = open_history(history, trainer)
    before = trainer.history, trainer.initial, trainer.records
    try:
        scalars = step_scalars(store)
        initial = stored_weights(store, 0, trainer.params) if len(store) else trainer.initial
        check_step_sizes(trainer, enumerate(scalars[0].tolist()))
        trainer.history, trainer.initial, trainer.records = store, initial, StoreLog(store, trainer)
        # w_T reads the records after the last stored weights, which nothing above read: one that is
        # not a PCMU record (or a damaged one) is refused here, with the trainer as it was.
        weights = trainer.replay(len(store)) if len(store) else None
    except BaseException:
        trainer.history, trainer.initial, trainer.records = before
        if not isinstance(history, HistoryStore):  # opened here from a path
            store.close()
        raise
    if weights is not None:
        trainer._reindex(scalars)
        with torch.no_grad():
            for p, w in zip(trainer.params, weights):
                p.copy_(w)


def mark(trainer) -> dict:
    """What the deletion ledger commits for store-backed records: the store's path and mark (length
    and digest of the records) and how many steps they hold."""
    return {"path": os.path.abspath(trainer.history.file.path), **trainer.history.mark(), "steps": len(trainer.records)}


def saved_mark(trainer, saved) -> dict:
    """A saved state's "history" (a `mark`), checked without changing anything: well-formed, this
    trainer records into a store, the store begins with the marked records (HistoryConflictError)
    and they are the saved number of steps."""
    if not (isinstance(saved, dict) and isinstance(saved.get("bytes"), int) and isinstance(saved.get("digest"), str)
            and isinstance(saved.get("steps"), int)):
        raise ValueError("saved PCMU state: 'history' must hold the store's bytes, digest and steps")
    if trainer.history is None:
        raise ValueError(f"saved PCMU state names records in a history store ({saved.get('path')}): build the "
                         "trainer with history= that store")
    store, mark = trainer.history, {"bytes": saved["bytes"], "digest": saved["digest"]}
    steps = len(trainer.records) if store.mark() == mark else store.steps_at(mark)
    if steps != saved["steps"]:
        raise ValueError(f"history {store.file.path} holds {steps} steps at the saved mark, the saved state "
                         f"{saved['steps']}")
    return saved


def restore(trainer, saved: dict) -> None:
    """Back to the records `saved` (a `mark` checked by saved_mark) covered: the store is cut back
    to them and the records are read again."""
    store = trainer.history
    mark = {"bytes": saved["bytes"], "digest": saved["digest"]}
    if store.mark() != mark:
        store.rollback(mark)
    trainer.records.reload()  # also when nothing was written after the mark (a record that failed before)
