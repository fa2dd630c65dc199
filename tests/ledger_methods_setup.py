"""One tiny problem per method family behind the deletion ledger, for the ledger's fault-injection
and corruption tests (not tests themselves). The loss can be made to raise at its n-th call, so a
request can be interrupted inside the method (scoring, repair, replay), not only at the commit."""
from __future__ import annotations

import copy
import os

import torch

import unlearn_ext as ue
from unlearn_ext.data import per_sample_cross_entropy
from unlearn_ext.pcmu import PCMUTrainer, PCMUUnlearner

METHODS = ("pcmu", "mini", "deltagrad", "topk", "randomk")


class InjectedFault(RuntimeError):
    pass


class FailingLoss:
    """Per-sample cross-entropy that raises InjectedFault at call number `fail_at` (1-based)."""

    def __init__(self):
        self.calls, self.fail_at = 0, None

    def __call__(self, outputs, targets):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise InjectedFault(f"injected failure at loss call {self.calls}")
        return per_sample_cross_entropy(outputs, targets)


def blobs(n=48, d=4, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, d, generator=g) + 1.5 * torch.nn.functional.one_hot(y, d).float()
    return x, y


def _mlp(d, classes, batch_norm: bool):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(d, 8)] + ([torch.nn.BatchNorm1d(8)] if batch_norm else []) + \
             [torch.nn.Tanh(), torch.nn.Linear(8, classes)]
    return torch.nn.Sequential(*layers)


class Setting:
    """Trains once per method; `unlearner()` builds a fresh, identical unlearner every call."""

    def __init__(self, method: str):
        self.method, self.loss = method, FailingLoss()
        x, y = blobs()
        self.data = ue.TrainingData(x, y, loss=self.loss)
        self.config = ue.SGDConfig(epochs=4, batch_size=16, lr=0.3, weight_decay=1e-3)
        # Top-K / Random-k: BatchNorm in training mode, so the repair moves buffers (state too).
        model = _mlp(4, 3, batch_norm=method in ("topk", "randomk"))
        if method == "pcmu":
            self.initial = model
        elif method == "mini":
            self.store = ue.mini_store(model)
            ue.train_recording_anchors(model, self.data, self.config, self.store, anchors=2)
        elif method == "deltagrad":
            self.store = ue.step_store(model, params="fp32", grads="fp32")
            ue.train_recording_steps(model, self.data, self.config, self.store)
        else:
            ue.train_sgd(model, self.data, self.config)
        self.trained = model

    def unlearner(self):
        model = copy.deepcopy(self.trained)
        if self.method == "pcmu":
            trainer = PCMUTrainer(model, None, self.data, batch_size=16, clip_norm=1.0, lr=0.1, tau=0.01,
                                  sigma=0.01, max_request=2)
            trainer.train(epochs=2)
            return PCMUUnlearner(trainer)
        if self.method == "mini":
            return ue.MiniUnlearner(model, self.data, self.store, curvature_samples=16, lanczos_steps=3)
        if self.method == "deltagrad":
            return ue.DeltaGradUnlearner(model, self.data, self.store, burn_in=2, period=3)
        cls = ue.TopKUnlearner if self.method == "topk" else ue.RandomKUnlearner
        return cls(model, self.data, self.config, k=0.2, repair_epochs=1, seed=3)


def same(a, b) -> bool:
    """Bit-for-bit equality of nested state (dicts, lists, tensors, numbers, strings)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def without_timing(value):
    """A ledger's request log without wall-clock fields ('seconds' at any depth): what must repeat."""
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


def requests_without_timing(ledger) -> list:
    return without_timing(ledger.requests)


def fail_commit_after_disk(m, where: str) -> None:
    """Makes the next commit fail after its state may have reached the disk (pytest's monkeypatch
    context `m`): "fold", the commit folds and ledger.json is renamed into place, then an error (as
    a failed directory fsync); "append", the journal append's fdatasync fails and the append cannot
    be cut back either."""
    import unlearn_ext.ledger as ledger_module
    from unlearn_ext.ledger import LEDGER, DeletionLedger
    if where == "fold":
        real = ledger_module.atomic_write

        def renamed_then_failed(path, write):
            real(path, write)
            if path.endswith(LEDGER):
                raise OSError("injected: fsync of the directory failed")
        m.setattr(ledger_module, "atomic_write", renamed_then_failed)
        m.setattr(DeletionLedger, "_should_fold", lambda self, record_bytes: True)
    elif where == "append":
        def failed(*args):
            raise OSError("injected: fsync failed")
        m.setattr(os, "fdatasync", failed)
        m.setattr(os, "ftruncate", failed)
    else:
        raise ValueError(f"where: 'fold' or 'append', got {where!r}")
