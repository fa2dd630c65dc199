"""Recording during training with one line (an optimizer step hook), and the bytes it will need.

    store = ue.HistoryStore.for_model(model, params="int8", grads="int8", keyframe_every=50)
    recorder = ue.HistoryRecorder(store, model, optimizer,     # the one line
                                  steps_per_epoch=len(loader), batch_seed=seed, n=len(dataset))
    for x, y, ids in loader:
        ...loss.backward()
        recorder.batch(ids)          # optional: exact batch ids of this step
        optimizer.step()             # the hook records w_t (before the update), g_t, lrs_t, ids

The hook runs before the optimizer's update, so step t holds the parameters the gradient was
taken at (what DeltaGrad and Mini-Unlearning replay). `steps=` records only chosen steps (anchors);
`recorder.attach(full_grad=[...])` adds extra fields (HistoryStore.for_model(extra=...)) to the
coming step's record, e.g. Mini-Unlearning's full-data gradient at an anchor.

Creating the recorder writes the run metadata (store.run_info): the optimizer's class name, every
param group's hyperparameters (param_groups; lrs), the ones all groups share at the top level
(weight_decay, momentum, dampening, nesterov, ...), and steps_per_epoch, batch_seed and n when
given. Each step records every group's lr (StoredStep.lrs; StoredStep.lr is the first group's).
"""
from __future__ import annotations

import json
import math
import warnings

import torch

from ..parameters import trainable
from . import codecs as hc
from .file import FRAME, HistoryFormatError, jsonable  # FRAME: the frame this build writes


class HistoryRecorder:
    def __init__(self, store, model, optimizer, *, steps=None, start_step: int = 0,
                 steps_per_epoch: int | None = None, batch_seed: int | None = None, n: int | None = None,
                 run_info: dict | None = None):
        """run_info: more JSON metadata for store.run_info (e.g. the loss or the data set name)."""
        self.store = store
        self.params = list(trainable(model).values())
        self.steps = None if steps is None else set(int(s) for s in steps)
        self.step = int(start_step)
        self._ids = None
        self._attached: dict = {}
        info = optimizer_info(optimizer, self.params)
        given = {"steps_per_epoch": steps_per_epoch, "batch_seed": batch_seed, "n": n}
        info.update({k: int(v) for k, v in given.items() if v is not None})
        info.update(run_info or {})
        try:
            store.set_run_info(**info)
        except HistoryFormatError as exc:  # resuming into a version-1 file: record steps, warn
            warnings.warn(f"run metadata not recorded: {exc}", RuntimeWarning, stacklevel=2)
        self._handle = optimizer.register_step_pre_hook(self._on_step)

    def batch(self, ids) -> None:
        """Batch ids of the coming optimizer step (recorded exactly, as int64)."""
        self._ids = ids

    def attach(self, **fields) -> None:
        """Extra fields (name=tensors) for the coming optimizer step's record; that step is
        recorded even when `steps=` does not list it."""
        for name in fields:
            if name in ("params", "grads"):
                raise ValueError(f"{name!r} is recorded by the hook itself; attach extra fields only")
        self._attached.update(fields)

    def _on_step(self, optimizer, args, kwargs):
        t, self.step = self.step, self.step + 1
        ids, self._ids = self._ids, None
        attached, self._attached = self._attached, {}
        if self.steps is not None and t not in self.steps and not attached:
            return
        fields = {}
        if "params" in self.store.fields:
            fields["params"] = [p.detach() for p in self.params]
        if "grads" in self.store.fields:  # a parameter without a gradient this step records zeros
            fields["grads"] = [p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in self.params]
        fields.update(attached)
        self.store.record(t, fields, lrs=[_number(g.get("lr")) for g in optimizer.param_groups], batch_ids=ids)

    def remove(self) -> None:
        """Stops recording (removes the hook)."""
        self._handle.remove()


def _number(x):
    """A hyperparameter as JSON: tensors (e.g. a tensor lr) become numbers, tuples lists."""
    if isinstance(x, torch.Tensor):
        return x.item() if x.numel() == 1 else x.tolist()
    if isinstance(x, tuple):
        return [_number(v) for v in x]
    return x


def optimizer_info(optimizer, params) -> dict:
    """Run metadata of an optimizer: its class name; per param group every JSON-representable
    hyperparameter and the positions (in `params`, the recorded tensors) of the group's tensors;
    lrs; and at the top level each hyperparameter whose value all groups share (a consumer that
    finds e.g. no top-level weight_decay must read param_groups: the groups differ)."""
    position = {id(p): i for i, p in enumerate(params)}
    groups = []
    for g in optimizer.param_groups:
        info = {k: _number(v) for k, v in g.items() if k != "params"}
        info = {k: v for k, v in info.items() if jsonable(v)}  # e.g. a scheduler's callable is left out
        info["param_indices"] = [position[id(p)] for p in g["params"] if id(p) in position]
        groups.append(info)
    shared = {}
    for key in groups[0] if groups else ():
        if key != "param_indices" and all(key in g and g[key] == groups[0][key] for g in groups):
            shared[key] = groups[0][key]
    shared.pop("lr", None)  # lrs carries every group's lr; a top-level lr would read as "the" lr
    return {**shared, "optimizer": type(optimizer).__name__, "param_groups": groups,
            "lrs": [g.get("lr") for g in groups]}


def estimate_bytes(model, steps: int, codecs: dict | None = None, *, keyframe_every: int = 50,
                   block_size: int = hc.DEFAULT_BLOCK, record_every: int = 1, batch_size: int = 0,
                   tier: str = "disk", param_groups: int = 1) -> dict:
    """Bytes a store will need for `steps` training steps, before training starts.

    codecs: {"params": codec or None, "grads": codec or None} (default int8 for both; params use
    closed-loop deltas with int codecs). record_every: record every k-th step. batch_size: ids per
    step (8 bytes each). On the disk tier each record also carries a frame and a JSON header
    (estimated from a header of the same shape, with one lr per param group, as the recorder
    writes; param_groups: their number). Returns a dict with payload, overhead, total, the fp32
    size and the compression ratio."""
    codecs = {"params": "int8", "grads": "int8"} if codecs is None else codecs
    shapes = [tuple(p.shape) for p in trainable(model).values()]
    records = -(-steps // record_every)
    payload, raw = 0, 0
    fp32 = sum(math.prod(s) for s in shapes) * 4
    for name, codec in codecs.items():
        if codec is None:
            continue
        hc.check_codec(codec)
        raw += fp32 * records
        if name == "params" and codec in hc.BITS:
            keys = -(-records // keyframe_every)
            payload += keys * hc.payload_bytes(codec, hc.KEYFRAME, shapes, block_size)
            payload += (records - keys) * hc.payload_bytes(codec, hc.DELTA, shapes, block_size)
        else:
            payload += records * hc.payload_bytes(codec, hc.PLAIN, shapes, block_size)
    payload += records * 8 * batch_size
    overhead = records * _record_overhead(codecs, shapes, batch_size, param_groups) if tier == "disk" else 0
    total = payload + overhead
    return {"payload": payload, "overhead": overhead, "total": total, "fp32": raw,
            "ratio": raw / payload if payload else float("nan")}


def _record_overhead(codecs, shapes, batch_size, param_groups) -> int:
    """Frame + JSON header of one disk record, with stats floats at their longest repr."""
    long_float = -1.2345678901234567e-300
    names = [n for n, c in codecs.items() if c is not None]
    sections = [[n, [["float32", 10**9]] * (2 * len(shapes)), 10**10, 2**32 - 1] for n in names]
    if batch_size:
        sections.append(["#batch_ids", [["int64", 10**6]], 10**10, 2**32 - 1])
    header = {"step": 10**6, "lr": long_float, "lrs": [long_float] * param_groups,
              "stats": {n: {"kind": "keyframe", "bytes": 10**9, "raw_bytes": 10**9, "max_err": long_float,
                            "rms_err": long_float} for n in names},
              "fields": {n: "keyframe" for n in names}, "batch_ids": True, "kind": "step", "sections": sections}
    return FRAME.size + len(json.dumps(header, separators=(",", ":")))
