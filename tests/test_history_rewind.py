"""The history store's exact fields, per-step meta, rewind (steps superseded in an append-only
file) and mark/rollback (history/store.py, history/file.py "Superseding steps")."""
from __future__ import annotations

import os

import pytest
import torch

from unlearn_ext.history.file import HistoryConflictError, HistoryFormatError
from unlearn_ext.history.store import FieldSpec, HistoryStore

FIELDS = {"codes": FieldSpec([(-1,)], "exact"), "pair": FieldSpec([(-1,), (-1,)], "exact")}


def step_tensors(t: int, version: int = 0) -> dict:
    """Step t's tensors (of a given version: a rewritten step differs), lengths varying per step."""
    g = torch.Generator().manual_seed(100 * version + t)
    return {"codes": [torch.randint(0, 255, (t + 1,), dtype=torch.uint8, generator=g)],
            "pair": [torch.randint(-2**31, 2**31 - 1, (2 * t,), dtype=torch.int32, generator=g),
                     torch.randn(t, generator=g)]}


def write(store: HistoryStore, steps, version: int = 0) -> None:
    for t in steps:
        store.record(t, step_tensors(t, version), lr=0.5 + t, meta={"t": t, "version": version, "x": [1.5, None]})


def assert_steps(store: HistoryStore, versions: dict) -> None:
    """The store holds exactly the steps in `versions` (step -> version), bit for bit."""
    assert store.steps == sorted(versions)
    for t, version in versions.items():
        s = store.read(t)
        want = step_tensors(t, version)
        for name, tensors in want.items():
            assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(s.tensors[name], tensors))
        assert s.meta == {"t": t, "version": version, "x": [1.5, None]} and s.lr == 0.5 + t


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_exact_fields_and_meta_read_back_bit_for_bit(tmp_path, tier):
    store = HistoryStore(FIELDS, tier=tier, path=str(tmp_path / "h") if tier == "disk" else None)
    write(store, range(5))
    assert_steps(store, {t: 0 for t in range(5)})
    if tier == "disk":
        store.close()
        with HistoryStore.open(str(tmp_path / "h"), writable=False) as reader:
            assert_steps(reader, {t: 0 for t in range(5)})


def test_exact_fields_refuse_what_they_cannot_store(tmp_path):
    store = HistoryStore(FIELDS, tier="host")
    with pytest.raises(ValueError, match=r"an exact field holds 1-D tensors.*got 2-D"):
        store.record(0, {"codes": [torch.zeros(2, 2, dtype=torch.uint8)]})
    with pytest.raises(ValueError, match="got 1-D torch.float64"):
        store.record(0, {"codes": [torch.zeros(2, dtype=torch.float64)]})
    with pytest.raises(TypeError, match="step meta 'x' is not JSON-serializable"):
        store.record(0, {"codes": [torch.zeros(2, dtype=torch.uint8)]}, meta={"x": object()})
    with pytest.raises(TypeError, match="step meta must be a dict of JSON values, got a list"):
        store.record(0, {"codes": [torch.zeros(2, dtype=torch.uint8)]}, meta=[1.5])
    assert not len(store)
    with pytest.raises(ValueError, match=r"give its shapes as \(-1,\) per tensor"):
        FieldSpec([(3,)], "exact")


def test_flat_reads_of_an_exact_field_are_refused_with_its_name():
    """read_flat and read_flat_many give fp32 vectors; an exact field's tensors have any dtype and length."""
    store = HistoryStore(FIELDS, tier="host")
    write(store, range(2))
    for read in (lambda: store.read_flat(0, "codes"), lambda: store.read_flat_many([0, 1], "codes")):
        with pytest.raises(ValueError, match="field 'codes' is exact"):
            read()
    with pytest.raises(ValueError, match="exact"):
        store.encoded(0, "codes")


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_rewind_supersedes_the_later_steps(tmp_path, tier):
    store = HistoryStore(FIELDS, tier=tier, path=str(tmp_path / "h") if tier == "disk" else None)
    write(store, range(6))
    store.rewind(3)
    assert store.steps == [0, 1, 2]
    with pytest.raises(ValueError, match="steps must increase"):
        store.record(2, step_tensors(2, 1))
    write(store, range(3, 5), version=1)
    assert_steps(store, {0: 0, 1: 0, 2: 0, 3: 1, 4: 1})
    if tier == "disk":
        store.close()
        reopened = HistoryStore.open(str(tmp_path / "h"))
        assert_steps(reopened, {0: 0, 1: 0, 2: 0, 3: 1, 4: 1})
        write(reopened, [5], version=1)
        reopened.close()


def test_a_reader_sees_the_old_steps_or_the_new_ones_never_a_mix(tmp_path):
    path = str(tmp_path / "h")
    store = HistoryStore(FIELDS, tier="disk", path=path)
    write(store, range(6))
    before = HistoryStore.open(path, writable=False)
    store.rewind(2)
    during = HistoryStore.open(path, writable=False)  # after the rewind, before the new steps
    write(store, range(2, 6), version=1)
    after = HistoryStore.open(path, writable=False)
    assert_steps(before, {t: 0 for t in range(6)})  # its records are still in the file
    assert_steps(during, {0: 0, 1: 0})
    assert_steps(after, {0: 0, 1: 0, **{t: 1 for t in range(2, 6)}})
    for reader in (before, during, after):
        reader.close()
    store.close()


def test_a_crash_before_the_rewind_was_whole_keeps_the_old_steps(tmp_path):
    """The rewind record cut off by a crash: reopening drops it (and anything after it): the old
    steps, all of them."""
    path = str(tmp_path / "h")
    store = HistoryStore(FIELDS, tier="disk", path=path)
    write(store, range(6))
    cut_at = store.mark()["bytes"]
    store.rewind(3)
    store.close()
    with open(path, "r+b") as f:
        f.truncate(cut_at + 10)  # inside the rewind record
    with pytest.warns(RuntimeWarning, match="dropped"):
        reopened = HistoryStore.open(path)
    assert_steps(reopened, {t: 0 for t in range(6)})
    reopened.close()


def test_rollback_to_a_mark_restores_the_superseded_steps(tmp_path):
    path = str(tmp_path / "h")
    store = HistoryStore(FIELDS, tier="disk", path=path)
    write(store, range(6))
    mark = store.mark()
    store.rewind(1)
    write(store, range(1, 7), version=1)
    store.rollback(mark)
    assert os.path.getsize(path) == mark["bytes"] and store.mark() == mark
    assert_steps(store, {t: 0 for t in range(6)})
    write(store, [6], version=2)  # and it records on after the mark
    with pytest.raises(HistoryConflictError, match="does not begin with the records of the mark"):
        store.rollback({**mark, "bytes": mark["bytes"] + 1})
    with pytest.raises(HistoryConflictError, match="does not begin with the records of the mark"):
        store.rollback({**mark, "digest": "0" * 64})
    assert_steps(store, {**{t: 0 for t in range(6)}, 6: 2})
    store.close()
    with pytest.raises(ValueError, match="need a disk store"):
        HistoryStore(FIELDS, tier="host").mark()


def test_steps_at_a_mark_counts_what_a_rollback_leaves_without_cutting(tmp_path):
    """steps_at(mark): the steps rollback(mark) leaves (rewinds after the mark undone), read before
    anything is cut, so a caller can refuse first; a mark the file does not begin with is refused."""
    path = str(tmp_path / "h")
    store = HistoryStore(FIELDS, tier="disk", path=path)
    write(store, range(3))
    early = store.mark()
    write(store, range(3, 6))
    store.rewind(2)  # a rewind inside the marked records counts too
    write(store, range(2, 4), version=1)
    mark = store.mark()
    store.rewind(1)
    write(store, range(1, 8), version=2)
    size, now = os.path.getsize(path), store.mark()
    assert (store.steps_at(early), store.steps_at(mark), store.steps_at(now)) == (3, 4, 8)
    with pytest.raises(HistoryConflictError, match="does not begin with the records of the mark"):
        store.steps_at({**mark, "digest": "0" * 64})
    assert os.path.getsize(path) == size and store.mark() == now and len(store) == 8
    store.rollback(mark)
    assert len(store) == 4
    store.close()


def test_rewind_is_refused_where_it_cannot_hold(tmp_path):
    delta = HistoryStore({"params": FieldSpec([(3,)], "int8", delta=True)}, tier="host")
    delta.record(0, {"params": [torch.ones(3)]})
    with pytest.raises(ValueError, match="delta-encoded; a closed-loop chain cannot restart"):
        delta.rewind(0)
    path = str(tmp_path / "h")
    HistoryStore(FIELDS, tier="disk", path=path).close()
    with HistoryStore.open(path, writable=False) as reader:
        with pytest.raises(RuntimeError, match="opened read-only"):
            reader.rewind(0)


def test_files_of_format_version_1_refuse_rewind_records(tmp_path, monkeypatch):
    import unlearn_ext.history.file as history_file
    path = str(tmp_path / "h")
    with monkeypatch.context() as m:
        m.setattr(history_file, "FORMAT_VERSION", 1)
        store = HistoryStore(FIELDS, tier="disk", path=path)
    write(store, range(2))
    with pytest.raises(HistoryFormatError, match="has no rewind records"):
        store.rewind(1)
    store.close()


def test_rewind_and_rollback_move_the_revision_past_every_earlier_one(tmp_path):
    """What is kept per store revision (the history digest, mini/history_digest.py) must not survive
    a rewind or a rollback: neither may give the store a revision it had before with other contents."""
    from unlearn_ext.mini.history_digest import history_sha256

    store = HistoryStore(FIELDS, tier="disk", path=str(tmp_path / "h"))
    write(store, range(3))
    seen = {store.revision}
    mark = store.mark()
    write(store, range(3, 6))
    seen.add(store.revision)
    before = history_sha256(store, [0, 5], ["codes"], "deltagrad")

    store.rewind(4)
    assert store.revision > max(seen)
    seen.add(store.revision)
    write(store, range(4, 6), version=1)  # steps 4, 5 again, other contents: back to the same count
    assert store.revision > max(seen)
    assert history_sha256(store, [0, 5], ["codes"], "deltagrad") != before
    seen.add(store.revision)

    store.rollback(mark)
    assert store.revision > max(seen)  # a reopened store counts from 0: the rollback must not
    seen.add(store.revision)
    write(store, range(3, 6), version=2)
    assert store.revision > max(seen)
    assert history_sha256(store, [0, 5], ["codes"], "deltagrad") == history_sha256(
        HistoryStore.open(str(tmp_path / "h"), writable=False), [0, 5], ["codes"], "deltagrad")
    store.close()

def test_a_mark_covers_only_records_that_are_on_disk(tmp_path, monkeypatch):
    """The deletion ledger commits a mark (durably): the records it covers must be durable too, or
    a power loss after the commit leaves a ledger naming bytes the file no longer has (and its
    restart cannot cut back to them). Records between fsyncs are only flushed, so mark() fsyncs."""
    path = str(tmp_path / "h")
    store = HistoryStore(FIELDS, tier="disk", path=path, keyframe_every=100)  # no fsync'd step in reach
    durable = []  # the file's size at each fsync of it: what a power loss keeps
    real_fsync = os.fsync

    def fsync(fd):
        real_fsync(fd)
        if os.path.samestat(os.fstat(fd), os.stat(path)):
            durable.append(os.fstat(fd).st_size)

    monkeypatch.setattr(os, "fsync", fsync)
    write(store, range(5))
    mark = store.mark()
    assert max(durable, default=0) >= mark["bytes"] == os.path.getsize(path)
    durable.clear()
    assert store.mark() == mark and not durable  # nothing new to sync: no fsync (the ledger marks often)
    write(store, [5])  # flushed, not fsync'd
    assert not durable
    assert store.mark()["bytes"] == os.path.getsize(path) == max(durable)
    store.close()


def test_rollback_keeps_the_writer_lock_throughout(tmp_path, monkeypatch):
    """rollback reindexes the cut file: another writer trying to open it at that moment (or at any
    moment of the rollback) is refused, so nothing can be appended between the cut and the reindex."""
    from unlearn_ext.history.file import HistoryFile, HistoryLockedError
    path = str(tmp_path / "h")
    store = HistoryStore(FIELDS, tier="disk", path=path)
    write(store, range(4))
    mark = store.mark()
    store.rewind(2)
    write(store, range(2, 5), version=1)
    attempts = []
    real_open, real_index = HistoryFile.open.__func__, HistoryFile._index_records

    def another_writer():
        if getattr(another_writer, "busy", False):  # its own open reindexes too
            return
        another_writer.busy = True
        try:
            real_open(HistoryFile, path).close()
            attempts.append("got in")
        except HistoryLockedError:
            attempts.append("refused")
        finally:
            another_writer.busy = False

    def open_(cls, *args, **kw):  # a (re)opening of the file: before it takes the lock
        another_writer()
        return real_open(cls, *args, **kw)

    def index_records(self, records, salvage):  # the cut file being reindexed
        another_writer()
        return real_index(self, records, salvage)

    monkeypatch.setattr(HistoryFile, "open", classmethod(open_))
    monkeypatch.setattr(HistoryFile, "_index_records", index_records)
    store.rollback(mark)
    monkeypatch.undo()
    assert attempts and set(attempts) == {"refused"}
    assert_steps(store, {t: 0 for t in range(4)})
    with pytest.raises(HistoryLockedError):  # still this store's to write
        HistoryStore.open(path)
    write(store, [4], version=2)
    store.close()
    with HistoryStore.open(path, writable=False) as reader:
        assert_steps(reader, {**{t: 0 for t in range(4)}, 4: 2})


def test_rollback_of_a_store_opened_by_a_relative_path_after_a_chdir(tmp_path, monkeypatch):
    """The store keeps writing the file it opened, whatever the working directory became."""
    monkeypatch.chdir(tmp_path)
    store = HistoryStore(FIELDS, tier="disk", path="h", keyframe_every=2)  # fsyncs (and checks the path) often
    write(store, range(3))
    mark = store.mark()
    store.rewind(1)
    write(store, range(1, 3), version=1)
    monkeypatch.chdir(tmp_path.parent)
    store.rollback(mark)
    write(store, range(3, 6))
    store.close()
    with HistoryStore.open(str(tmp_path / "h"), writable=False) as reader:
        assert_steps(reader, {t: 0 for t in range(6)})


def test_a_rollback_keeps_the_stores_nonfinite_policy(tmp_path):
    """The rollback reopens the file in place; the policy the store was made with (nonfinite='skip')
    is not in the file and must not fall back to the default ('error')."""
    store = HistoryStore({"w": FieldSpec([(3,)], "fp32")}, tier="disk", path=str(tmp_path / "h"), nonfinite="skip")
    store.record(0, {"w": [torch.ones(3)]})
    mark = store.mark()
    store.record(1, {"w": [torch.ones(3)]})
    store.rollback(mark)
    assert store.nonfinite == "skip"
    assert store.record(1, {"w": [torch.tensor([1.0, float("nan"), 0.0])]}) is None  # skipped, as before
    assert store.steps == [0] and store.skipped_steps[-1] == 1
    store.close()
