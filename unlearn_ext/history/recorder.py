"""Recording during training with one line (an optimizer step hook), and the bytes it will need.

    store = ue.HistoryStore.for_model(model, params="int8", grads="int8", keyframe_every=50)
    recorder = ue.HistoryRecorder(store, model, optimizer)   # the one line
    for x, y, ids in loader:
        ...loss.backward()
        recorder.batch(ids)          # optional: exact batch ids of this step
        optimizer.step()             # the hook records w_t (before the update), g_t, lr_t, ids

The hook runs before the optimizer's update, so step t holds the parameters the gradient was
taken at (what DeltaGrad and Mini-Unlearning replay). `steps=` records only chosen steps (anchors).
"""
from __future__ import annotations

import json
import math

import torch

from ..per_sample import trainable
from . import codecs as hc
from .file import FRAME


class HistoryRecorder:
    def __init__(self, store, model, optimizer, *, steps=None, start_step: int = 0):
        self.store = store
        self.params = list(trainable(model).values())
        self.steps = None if steps is None else set(int(s) for s in steps)
        self.step = int(start_step)
        self._ids = None
        self._handle = optimizer.register_step_pre_hook(self._on_step)

    def batch(self, ids) -> None:
        """Batch ids of the coming optimizer step (recorded exactly, as int64)."""
        self._ids = ids

    def _on_step(self, optimizer, args, kwargs):
        t, self.step = self.step, self.step + 1
        ids, self._ids = self._ids, None
        if self.steps is not None and t not in self.steps:
            return
        fields = {}
        if "params" in self.store.fields:
            fields["params"] = [p.detach() for p in self.params]
        if "grads" in self.store.fields:  # a parameter without a gradient this step records zeros
            fields["grads"] = [p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in self.params]
        self.store.record(t, fields, lr=optimizer.param_groups[0].get("lr"), batch_ids=ids)

    def remove(self) -> None:
        """Stops recording (removes the hook)."""
        self._handle.remove()


def estimate_bytes(model, steps: int, codecs: dict | None = None, *, keyframe_every: int = 50,
                   block_size: int = hc.DEFAULT_BLOCK, record_every: int = 1, batch_size: int = 0,
                   tier: str = "disk") -> dict:
    """Bytes a store will need for `steps` training steps, before training starts.

    codecs: {"params": codec or None, "grads": codec or None} (default int8 for both; params use
    closed-loop deltas with int codecs). record_every: record every k-th step. batch_size: ids per
    step (8 bytes each). On the disk tier each record also carries a frame and a JSON header
    (estimated from a header of the same shape). Returns a dict with payload, overhead, total, the
    fp32 size and the compression ratio."""
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
    overhead = records * _record_overhead(codecs, shapes, batch_size) if tier == "disk" else 0
    total = payload + overhead
    return {"payload": payload, "overhead": overhead, "total": total, "fp32": raw,
            "ratio": raw / payload if payload else float("nan")}


def _record_overhead(codecs, shapes, batch_size) -> int:
    """Frame + JSON header of one disk record, with stats floats at their longest repr."""
    long_float = -1.2345678901234567e-300
    names = [n for n, c in codecs.items() if c is not None]
    sections = [[n, [["float32", 10**9]] * (2 * len(shapes)), 10**10, 2**32 - 1] for n in names]
    if batch_size:
        sections.append(["#batch_ids", [["int64", 10**6]], 10**10, 2**32 - 1])
    header = {"step": 10**6, "lr": long_float,
              "stats": {n: {"kind": "keyframe", "bytes": 10**9, "raw_bytes": 10**9, "max_err": long_float,
                            "rms_err": long_float} for n in names},
              "fields": {n: "keyframe" for n in names}, "batch_ids": True, "kind": "step", "sections": sections}
    return FRAME.size + len(json.dumps(header, separators=(",", ":")))
