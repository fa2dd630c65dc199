"""The history digest that binds a history method to its history (mini/history_digest.py) covers
every recorded step: two histories that differ only in one middle step's gradient (or weights)
have different digests, for DeltaGrad and Mini-Unlearning, without decoding any step; the same
recording gives the same digest after a reopen from disk."""
from __future__ import annotations

import copy

import torch

import unlearn_ext as ue
from unlearn_ext.history import HistoryStore
from unlearn_ext.mini.history_digest import history_sha256

from history_methods_setup import classification

CONFIG = ue.SGDConfig(epochs=3, batch_size=20, lr=0.3, weight_decay=1e-3)


def _copy(store: HistoryStore, changed_step=None, field=None, **store_kw) -> HistoryStore:
    """A copy of `store` recorded again step by step (the same codes), with one element of
    `field` at `changed_step` moved by a tenth of the tensor's absmax (a dozen int8 steps)."""
    out = HistoryStore({k: v for k, v in store.fields.items()}, run_info=store.run_info,
                       keyframe_every=store.keyframe_every, **store_kw)
    for s in store.iter():
        tensors = {k: [t.clone() for t in v] for k, v in s.tensors.items()}
        if s.step == changed_step:
            first = tensors[field][0].view(-1)
            first[0] += 0.1 * float(first.abs().max())
        out.record(s.step, tensors, lr=s.lr, batch_ids=s.batch_ids)
    return out


def _trained(method):
    data, init = classification(n=60, d=4, classes=3, seed=2)
    model = copy.deepcopy(init)
    if method == "deltagrad":
        store = ue.step_store(model, params="fp32", grads="int8")
        ue.train_recording_steps(model, data, CONFIG, store)
        return store, ["params", "grads"]
    store = ue.mini_store(model)
    ue.train_recording_anchors(model, data, CONFIG, store)
    from unlearn_ext.mini.record import FULL_GRAD
    return store, ["params", FULL_GRAD]


def test_a_changed_middle_step_changes_the_digest(tmp_path):
    for method in ("deltagrad", "mini"):
        store, names = _trained(method)
        steps = store.steps
        middle = steps[len(steps) // 2]
        assert 0 < middle < steps[-1]
        ends = sorted({steps[0], steps[-1]})
        digest = history_sha256(store, ends, names, method)
        assert history_sha256(_copy(store), ends, names, method) == digest  # the same recording, the same digest
        on_disk = _copy(store, tier="disk", path=str(tmp_path / f"{method}.hist"))
        on_disk.close()
        assert history_sha256(HistoryStore.open(str(tmp_path / f"{method}.hist")), ends, names, method) == digest
        for field in names:
            changed = _copy(store, middle, field)
            assert history_sha256(changed, ends, names, method) != digest, (method, field)


def test_the_digest_is_kept_while_the_store_is_unchanged_and_recomputed_after_a_change(monkeypatch):
    """A second call on the same store does not walk the schedule again; recording a step or new run
    metadata gives the digest a fresh store with the same contents has."""
    store, names = _trained("deltagrad")
    ends = sorted({store.steps[0], store.steps[-1]})
    digest = history_sha256(store, ends, names, "deltagrad")
    walks = []
    schedule = HistoryStore.schedule
    monkeypatch.setattr(HistoryStore, "schedule", lambda self: walks.append(1) or schedule(self))
    assert history_sha256(store, ends, names, "deltagrad") == digest and not walks
    assert history_sha256(store, ends[-1:], names, "deltagrad") == digest and walks  # another argument set: computed

    last = store.read(store.steps[-1])
    store.record(store.steps[-1] + 1, last.tensors, lr=last.lr, batch_ids=last.batch_ids)
    grown = history_sha256(store, ends, names, "deltagrad")
    assert grown != digest and grown == history_sha256(_copy(store), ends, names, "deltagrad")

    store.set_run_info(note="changed")
    assert history_sha256(store, ends, names, "deltagrad") not in (digest, grown)
    assert history_sha256(store, ends, names, "deltagrad") == history_sha256(_copy(store), ends, names, "deltagrad")
