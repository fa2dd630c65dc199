"""PCMU's step records in a history store on disk (docs/design.md §5): `PCMUTrainer(...,
history=path_or_store)`.

Each step is one store record: its tensors (records.PCMUStep.to_record: packed codes, fragile values,
indices, radii) as exact fields, its step size as the record's lr, its scalars as the record's meta;
step 0 also holds the initial weights (field "initial"), which replaying the codes starts from. So
the records are crash-safe and locked like every history file (history/file.py): one writer, fsync'd
every keyframe_every records, a crash-cut tail dropped on reopening and reported (store.recovery).
The store's run metadata holds the trainer's fingerprint; a trainer built over an existing file with
another configuration or model is refused, naming what differs.

Reopening: a trainer built over an existing file restores the recorded steps (the initial weights
and the codes of every step; the model's weights become the replayed w_T), and trains on from there.
What requests changed besides the records (the forgotten ids) is the deletion ledger's: a
`DeletionLedger` over the trainer's unlearner restores it, and cuts the store back to the records
its last commit covered.

Rewriting from a step t0 (the fallback) appends a rewind record and the new steps (the store's
`rewind`): the file stays append-only, a reader sees the old steps or the new ones, never a mix, and
the deletion ledger commits a `mark()` of the store (length + digest) instead of a copy of the
records, so a request costs what it changed; rolling a failed request back cuts the file to the
mark, and the superseded steps read again.

Why the in-memory `StepLog` stays the default: without a path there is no file to make crash-safe,
and a store in memory would hold the same bytes as the StepLog while the ledger would still have to
copy them. Both hold the same encoding (to_record / to_state). Here the records are also kept in
memory (the checks read them at every request); the store is their durable copy.
"""
from __future__ import annotations

import json
import math
import os

import torch

from ..history.store import FieldSpec, HistoryStore
from ..step_log import StepLog
from ..unlearner import fingerprint_differences
from .records import RECORD_TENSORS, PCMUStep, check_step_sizes

RUN_KEY = "pcmu"        # run metadata: the trainer's fingerprint
INITIAL = "initial"     # step 0's field: the initial weights, one flat float32 tensor per parameter
# Records between fsyncs of a store created from a path (exact fields have no keyframes: this is the
# store's keyframe_every, which also bounds the tail a crash can cost).
SYNC_EVERY = 50


def fields(parameters: int) -> dict:
    """The store's fields for a model of `parameters` trainable tensors."""
    exact = {name: FieldSpec([(-1,)], "exact") for name in RECORD_TENSORS}
    return {**exact, INITIAL: FieldSpec([(-1,)] * parameters, "exact")}


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


class StoreLog(StepLog):
    """The trainer's records (a StepLog) whose every change is also written to a disk store:
    append records a step, truncate rewinds the store; step 0 records `trainer.initial` too."""

    def __init__(self, store: HistoryStore, trainer):
        self.store, self.trainer = store, trainer
        super().__init__(load_records(store))
        self.mark_clean()

    def append(self, entry: PCMUStep) -> None:
        tensors, meta = entry.to_record()
        if entry.step == 0:
            tensors[INITIAL] = [w.detach().reshape(-1).to("cpu", torch.float32) for w in self.trainer.initial]
        self.store.record(entry.step, {k: [v] if k != INITIAL else v for k, v in tensors.items()},
                          lr=entry.step_size, meta=meta)
        super().append(entry)

    def truncate(self, length: int) -> None:
        length = max(int(length), 0)
        if length < len(self):
            self.store.rewind(length)
        super().truncate(length)

    def replace(self, entries) -> None:
        self.truncate(0)
        for e in entries:
            self.append(e)

    def restore_clean(self) -> None:
        raise RuntimeError("records in a history store are rolled back through the store (the state's "
                           "'history' mark, persistence.py), not through the StepLog's marks")

    def reload(self) -> None:
        """The records as the store holds them now (after the store was rolled back)."""
        self._entries = load_records(self.store)  # the store's own rewind already happened: not truncate()
        self.mark_clean()


def load_records(store: HistoryStore) -> list[PCMUStep]:
    """Every step the store holds, refused unless they are steps 0, 1, ... each with a whole record."""
    records = []
    for i, s in enumerate(store.iter()):
        try:
            if s.step != i:
                raise ValueError(f"step {s.step} where step {i} was expected")
            records.append(PCMUStep.from_record(s.step, s.lr, {k: v[0] for k, v in s.tensors.items() if k != INITIAL},
                                                s.meta))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"history {store.file.path}: step record {i} is not a PCMU record "
                             f"({type(exc).__name__}: {exc})") from None
    return records


def initial_weights(store: HistoryStore, shapes) -> list[torch.Tensor]:
    """The initial weights step 0 recorded, shaped like the parameters."""
    flat = store.read(0, [INITIAL]).tensors.get(INITIAL)
    if flat is None or [t.numel() for t in flat] != [math.prod(s) for s in shapes] or any(
            t.dtype != torch.float32 for t in flat):
        raise ValueError(f"history {store.file.path}: step 0 does not hold this model's initial weights (float32, "
                         "one tensor per parameter)")
    return [t.reshape(shape) for t, shape in zip(flat, shapes)]


def attach(trainer, history) -> None:
    """Makes `trainer` record into `history` (open_history); over a file holding steps, restores
    them: the initial weights, the records, the per-step index, and the model's weights (w_T
    replayed). Refused before the trainer changes when the steps' learning rates are not the
    trainer's."""
    store = open_history(history, trainer)
    try:
        log = StoreLog(store, trainer)
        initial = initial_weights(store, trainer.shapes) if len(log) else trainer.initial
        check_step_sizes(trainer, [(r.step, r.step_size) for r in log])
    except BaseException:
        if not isinstance(history, HistoryStore):  # opened here from a path
            store.close()
        raise
    trainer.history, trainer.initial, trainer.records = store, initial, log
    if len(log):
        trainer._reindex()
        with torch.no_grad():
            for p, w in zip(trainer.params, trainer.replay(len(log))):
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
        trainer.records.reload()
