"""What binds a history method's saved state to the history it was computed from.

A ledger of Mini-Unlearning or DeltaGrad holds weights computed from one training history; the
same model shapes and data with another history (other initial weights, another learning rate or
batch order) would answer the next request from that other run on top of these weights. The
fingerprint therefore carries `history_sha256`: a digest of the run metadata, every step's learning
rates and batch ids, and every recorded step's weights (and gradients) through the digests the
store took of their codes when each step was recorded (HistoryStore.field_digests): a history that
differs in any one step, a middle one included, has another digest, and nothing is decoded.
Histories recorded before the store took digests fall back to the decoded values of the steps a
method names (for Mini-Unlearning every anchor, for DeltaGrad the first and last step).

The digest is kept per store and argument set while the store is unchanged (its `revision`: a
recorded step or new run metadata makes a new one), so a method built again on the same history
(one unlearner per request, as the harness does) does not hash every step's batch ids again.

It also refuses a schedule the replay cannot follow: param groups whose learning rates differ at
some step (a scheduler that moved one group), since both methods use one learning rate for every
parameter.
"""
from __future__ import annotations

import hashlib
import json
import weakref

from ..data import tensors_sha256
from .record import UnsupportedOptimizerError

# store -> {(tensor_steps, names, method): (store revision, digest)}; an entry goes with its store.
_DIGESTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def history_sha256(store, tensor_steps, names, method: str) -> str:
    """The digest (module docstring), kept while the store's revision is unchanged; a store without
    a revision (one that cannot say it changed) is hashed at every call."""
    revision = getattr(store, "revision", None)
    if revision is None:
        return _history_sha256(store, tensor_steps, names, method)
    key = (tuple(tensor_steps), tuple(names), method)
    kept = _DIGESTS.setdefault(store, {}).get(key)
    if kept is not None and kept[0] == revision:
        return kept[1]
    digest = _history_sha256(store, tensor_steps, names, method)
    _DIGESTS[store][key] = (revision, digest)
    return digest


def _history_sha256(store, tensor_steps, names, method: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(store.run_info, sort_keys=True).encode())
    h.update(json.dumps({name: spec.describe() for name, spec in store.fields.items()}, sort_keys=True).encode())
    for step, lr, lrs, ids in store.schedule():
        if lrs is not None and any(v != lrs[0] for v in lrs):
            raise UnsupportedOptimizerError(f"{method}: at step {step} the param groups' learning rates differ "
                                            f"({lrs}); one learning rate for every parameter is supported")
        h.update(f"{step};{lr!r};{lrs!r};".encode())
        if ids is not None:
            h.update(tensors_sha256([ids]).encode())
    digests = store.field_digests(names)
    if digests is not None:
        for step, values in digests:
            h.update(f"{step}:{','.join(values)};".encode())
        return h.hexdigest()
    for t in tensor_steps:
        stored = store.read(t, names)
        h.update(f"{t}:".encode())
        h.update(tensors_sha256([x for name in names if name in stored.tensors for x in stored.tensors[name]]).encode())
    return h.hexdigest()
