"""The history file under hostile conditions (docs/design.md §10, "no silent wrong data"):
two writers, a reader during recording, a stale handle, bit flips in frame lengths, cuts at every
byte, a file cut during creation, a damaged record since the last keyframe, the salvage open.
Each test either reads correct data or gets an error naming the problem; never wrong data."""
import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import unlearn_ext as ue
from unlearn_ext.history import FieldSpec, HistoryStore
from unlearn_ext.history import file as history_file

SHAPES = [(7, 5), (5,)]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tensors(seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) for s in SHAPES]


def new_store(path, keyframe_every=5, **kw):
    return HistoryStore({"params": FieldSpec(SHAPES, "int8", delta=True), "grads": FieldSpec(SHAPES, "int8")},
                        tier="disk", path=path, keyframe_every=keyframe_every, **kw)


def record(store, steps):
    for t in steps:
        store.record(t, {"params": tensors(t), "grads": tensors(1000 + t)}, lr=0.1, batch_ids=[t])


def write_store(path, steps=20, keyframe_every=5, crashed=False):
    """A closed store of `steps` steps and what each step reads back as. crashed: the file as a
    process that died after its last record leaves it (no close, so no sync mark at the end)."""
    store = new_store(path, keyframe_every)
    record(store, range(steps))
    truth = {t: store.read(t) for t in range(steps)}
    image = open(path, "rb").read()
    store.close()
    if crashed:
        with open(path, "wb") as f:
            f.write(image)
    return truth


def same(a, b):
    assert a.step == b.step and a.lr == b.lr and torch.equal(a.batch_ids, b.batch_ids)
    for name in b.tensors:
        assert all(torch.equal(x, y) for x, y in zip(a.tensors[name], b.tensors[name])), (a.step, name)


def check_reads(store, truth):
    for t in store.steps:
        same(store.read(t), truth[t])


def offsets(path):
    with HistoryStore.open(path, writable=False) as store:
        return {e.step: e.file_entry for e in store._entries}


def flip_bit(path, pos, bit):
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([b ^ (1 << bit)]))


# ---- one writer per file -----------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import sys, torch
    from unlearn_ext.history import FieldSpec, HistoryStore
    path, how = sys.argv[1], sys.argv[2]
    try:
        if how == "open":
            store = HistoryStore.open(path)
        else:
            store = HistoryStore({"g": FieldSpec([(3,)], "fp32")}, tier="disk", path=path, overwrite=True)
        store.record(100, {"params": [torch.zeros(7, 5), torch.zeros(5)]})
        store.close()
        print("RECORDED")
    except Exception as exc:
        print(type(exc).__name__, exc)
""")


def run_child(path, how):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", CHILD, path, how], capture_output=True, text=True, timeout=120,
                         env=env)
    return out.stdout + out.stderr


def test_a_second_writer_process_is_refused(tmp_path):
    path = str(tmp_path / "h.uehist")
    truth = write_store(path, steps=7)
    store = HistoryStore.open(path)
    record(store, [7])
    for how in ("open", "create"):  # opening to append, or creating over it (even with overwrite)
        out = run_child(path, how)
        assert "HistoryLockedError" in out and path in out and "RECORDED" not in out, out
    record(store, [8])
    truth[7], truth[8] = store.read(7), store.read(8)
    store.close()
    reopened = HistoryStore.open(path)
    assert reopened.steps == list(range(9)) and reopened.recovery.dropped_bytes == 0
    check_reads(reopened, truth)
    reopened.close()
    assert "RECORDED" in run_child(path, "open")  # once the writer closed, the next one may append


def test_second_writer_handle_in_one_process_is_refused(tmp_path):
    path = str(tmp_path / "h.uehist")
    write_store(path, steps=3)
    with HistoryStore.open(path):
        with pytest.raises(ue.HistoryLockedError, match=f"{path} is open for writing.*writable=False"):
            HistoryStore.open(path)
        with pytest.raises(ue.HistoryLockedError):
            new_store(path, overwrite=True)
        assert HistoryStore.open(path, writable=False).steps == [0, 1, 2]


def test_reader_during_recording_never_truncates(tmp_path):
    """A record being written shows as a torn tail to a reader: reported, left alone; the reader
    sees the whole records; the default (writable) open is refused instead of truncating it."""
    path = str(tmp_path / "h.uehist")
    truth = write_store(path, steps=8)
    store = HistoryStore.open(path)
    last = offsets(path)[7]
    with open(path, "rb") as f:
        f.seek(last.offset)
        half = f.read((last.payload_offset + last.payload_len - last.offset) // 2)
    store.file._f.seek(0, os.SEEK_END)
    store.file._f.write(half)  # the writer in the middle of its next record
    store.file._f.flush()
    size = os.path.getsize(path)
    with pytest.raises(ue.HistoryLockedError):
        HistoryStore.open(path)
    with pytest.warns(RuntimeWarning, match="left them in the file"):
        reader = HistoryStore.open(path, writable=False)
    assert reader.steps == list(range(8)) and reader.recovery.dropped_records == 1
    assert not reader.recovery.truncated and os.path.getsize(path) == size
    check_reads(reader, truth)


def test_stale_handle_cannot_append(tmp_path, monkeypatch):
    """Where the lock does not hold (some network file systems), a handle whose file another
    writer appended to refuses to append: its deltas would refer to records it never saw."""
    path = str(tmp_path / "h.uehist")
    write_store(path, steps=4)
    a = HistoryStore.open(path)
    monkeypatch.setattr(history_file, "_lock", lambda f, path: None, raising=False)
    b = HistoryStore.open(path)
    record(b, [4, 5])
    truth = {t: b.read(t) for t in range(6)}
    b.close()
    with pytest.raises(ue.HistoryConflictError, match="changed under this writing handle.*size"):
        record(a, [4])
    with pytest.raises(RuntimeError, match="cannot record any more"):
        record(a, [5])
    a.close()
    reopened = HistoryStore.open(path)
    assert reopened.steps == list(range(6))
    check_reads(reopened, truth)


def test_replaced_file_is_detected_before_appending(tmp_path, monkeypatch):
    path = str(tmp_path / "h.uehist")
    write_store(path, steps=3)
    a = HistoryStore.open(path)
    monkeypatch.setattr(history_file, "_lock", lambda f, path: None, raising=False)
    os.remove(path)
    write_store(path, steps=3)  # another run at the same path: same size, same records
    before = open(path, "rb").read()
    with pytest.raises(ue.HistoryConflictError, match="another file"):
        record(a, [3, 4, 5])  # checked before the next fsync'd record at the latest (keyframe 5)
    assert open(path, "rb").read() == before  # the new file was never written to


def test_open_refuses_steps_of_two_writers(tmp_path, monkeypatch):
    path = str(tmp_path / "h.uehist")
    truth = write_store(path, steps=6)
    a = HistoryStore.open(path)
    monkeypatch.setattr(history_file, "_lock", lambda f, path: None, raising=False)

    def append_at_the_end(self, path_too=True):  # what a handle without the checks did: append where the file ends
        self._end = os.path.getsize(path)
    monkeypatch.setattr(history_file.HistoryFile, "_check_unchanged", append_at_the_end, raising=False)
    b = HistoryStore.open(path)
    record(b, [6, 7])
    b.close()
    record(a, [6])  # the file now holds steps ..., 6, 7, 6
    a.close()
    with pytest.raises(ue.HistoryCorruptError, match="step 6 .* does not come after step 7.*two writers"):
        HistoryStore.open(path, writable=False)
    with pytest.warns(RuntimeWarning, match="two writers"):
        salvaged = HistoryStore.open(path, salvage=True)
    assert salvaged.steps == list(range(8))
    check_reads(salvaged, truth | {t: salvaged.read(t) for t in (6, 7)})
    with pytest.raises(ValueError, match="steps must strictly increase"):
        a.file.append({"step": 5}, [], sync=False)


# ---- damaged frames and cut files --------------------------------------------------------------------

@pytest.fixture(scope="module")
def written(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("flip") / "h.uehist")
    return path, write_store(path, steps=20, keyframe_every=5, crashed=True), offsets(path)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(["head_len", "payload_len"]), bit=st.integers(0, 63))
def test_bit_flip_in_a_middle_frame_length_is_corruption(written, tmp_path, field, bit):
    """A flipped length of a record with fsync'd records after it is damage, not a crash cut:
    every open refuses (naming salvage) and leaves the file alone; salvage reads what is before."""
    src, truth, entries = written
    path = str(tmp_path / f"flip-{field}-{bit}.uehist")
    shutil.copy(src, path)
    e = entries[7]  # keyframes at 0, 5, 10, 15: step 7 is well before the last fsync
    pos, width = (e.offset + 4, 4) if field == "head_len" else (e.offset + 8, 8)
    flip_bit(path, pos + (bit % (8 * width)) // 8, bit % 8)
    before = open(path, "rb").read()
    for writable in (True, False):
        with pytest.raises(ue.HistoryCorruptError, match="salvage=True"):
            HistoryStore.open(path, writable=writable)
    assert open(path, "rb").read() == before
    with pytest.warns(RuntimeWarning, match="dropped"):
        salvaged = HistoryStore.open(path, salvage=True)
    assert salvaged.steps == list(range(7)) and salvaged.recovery.dropped_records == 13
    assert not salvaged.file.writable and open(path, "rb").read() == before
    check_reads(salvaged, truth)


def test_damage_in_the_unsynced_tail_is_a_crash_with_true_counts(written, tmp_path):
    """After the last keyframe (fsync) a crash can lose any page: the first damaged record and all
    after it are dropped, and the report counts each of them."""
    src, truth, entries = written
    path = str(tmp_path / "h.uehist")
    shutil.copy(src, path)
    flip_bit(path, entries[17].offset + 9, 2)  # step 17's payload length
    with pytest.warns(RuntimeWarning, match=r"dropped \d+ bytes \(3 records\)"):
        store = HistoryStore.open(path)
    assert store.steps == list(range(17)) and store.recovery.truncated
    check_reads(store, truth)
    record(store, [17])
    store.close()
    assert HistoryStore.open(path).steps == list(range(18))


def test_damaged_payload_in_the_unsynced_tail_is_cut_there(written, tmp_path):
    """Records written after the last fsync can reach the disk out of order: a damaged payload
    there is verified at open, and the store is cut at the first bad one."""
    src, truth, entries = written
    path = str(tmp_path / "h.uehist")
    shutil.copy(src, path)
    e = entries[16]
    flip_bit(path, e.payload_offset + e.payload_len - 3, 0)  # its batch ids
    with pytest.warns(RuntimeWarning, match=r"\(4 records\).*payload checksum"):
        store = HistoryStore.open(path, writable=False)
    assert store.steps == list(range(16)) and os.path.getsize(path) == os.path.getsize(src)
    check_reads(store, truth)


def test_damaged_params_record_since_the_last_keyframe(tmp_path):
    """The default (writable) open rebuilds the delta encoder from the last keyframe: a damaged
    parameter delta there is inside the unsynced tail, so the store is cut back to the last good
    record (crash recovery) and keeps every good step before it, and recording continues."""
    path = str(tmp_path / "h.uehist")
    truth = write_store(path, steps=13, keyframe_every=5, crashed=True)  # keyframe at 10, deltas 11, 12
    e = offsets(path)[11]
    flip_bit(path, e.payload_offset + 5, 3)  # inside its params section
    with pytest.warns(RuntimeWarning, match=r"\(2 records\)"):
        store = HistoryStore.open(path)
    assert store.steps == list(range(11))
    check_reads(store, truth)
    record(store, [11, 12])
    got = store.read(12).tensors["params"]
    assert max(float((a - b).abs().max()) for a, b in zip(got, tensors(12))) == store.report()[-2]["max_err"]


def test_damaged_keyframe_tells_how_to_salvage(tmp_path):
    """A damaged fsync'd keyframe is not a crash: nothing is truncated, the writable open fails
    saying how to read the good steps, and those reads work."""
    path = str(tmp_path / "h.uehist")
    truth = write_store(path, steps=13, keyframe_every=5, crashed=True)
    e = offsets(path)[10]
    flip_bit(path, e.payload_offset + 5, 3)
    size = os.path.getsize(path)
    with pytest.raises(ue.HistoryCorruptError, match="step 10.*writable=False.*salvage=True"):
        HistoryStore.open(path)
    assert os.path.getsize(path) == size
    reader = HistoryStore.open(path, writable=False)  # every step, only those needing step 10 fail
    assert reader.steps == list(range(13))
    for t in range(10):
        same(reader.read(t), truth[t])
    with pytest.raises(ue.HistoryCorruptError, match="step 10"):
        reader.read(12)
    with pytest.warns(RuntimeWarning, match="payload checksum"):
        salvaged = HistoryStore.open(path, salvage=True)
    assert salvaged.steps == list(range(10)) and salvaged.recovery.dropped_records == 3
    check_reads(salvaged, truth)


def test_truncation_at_every_byte_never_gives_wrong_data(tmp_path):
    """A file cut at any byte either opens to a correct prefix of its steps or raises a history
    error; the writable open then records on."""
    src = str(tmp_path / "src.uehist")
    store = HistoryStore({"w": FieldSpec([(3,)], "int8", delta=True)}, tier="disk", path=src, keyframe_every=2,
                         run_info={"n": 3})
    for t in range(5):
        store.record(t, {"w": [torch.full((3,), float(t))]})
    truth = {t: store.read(t) for t in range(5)}
    store.close()
    data = open(src, "rb").read()
    path = str(tmp_path / "cut.uehist")
    opened = 0
    for n in range(len(data)):
        with open(path, "wb") as f:
            f.write(data[:n])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a torn tail is reported; what matters is what is read
                s = HistoryStore.open(path, writable=False)
        except (ue.HistoryFormatError, ue.HistoryCorruptError):
            continue
        opened += 1
        assert s.steps == list(range(len(s.steps)))
        for t in s.steps:
            assert torch.equal(s.read(t).tensors["w"][0], truth[t].tensors["w"][0])
        s.close()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w = HistoryStore.open(path)  # the writable open truncates the torn tail, then appends
        assert w.steps == s.steps
        w.record(len(w.steps), {"w": [torch.full((3,), float(len(w.steps)))]})
        w.close()
        assert HistoryStore.open(path, writable=False).steps == list(range(len(s.steps) + 1))
    assert opened > len(data) // 2


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_file_cut_during_creation_is_recreated(tmp_path):
    src = str(tmp_path / "src.uehist")
    new_store(src).close()
    data = open(src, "rb").read()
    first = len(data)  # a store without steps: the first record only
    for n in (0, 3, 8, 12, 30, first // 2, first - 1):
        path = str(tmp_path / f"cut{n}.uehist")
        with open(path, "wb") as f:
            f.write(data[:n])
        if n:
            with pytest.raises(ue.HistoryFormatError, match="cut off while it was being created.*create the store"):
                HistoryStore.open(path)
        with pytest.warns(RuntimeWarning, match="creating the store anew") if n else _nothing():
            store = new_store(path)
        record(store, [0])
        store.close()
        assert HistoryStore.open(path).steps == [0]
    zeros = str(tmp_path / "zeros.uehist")
    with open(zeros, "wb") as f:
        f.write(b"\0" * 300)  # a power loss after the size reached the disk but not the bytes
    with pytest.warns(RuntimeWarning, match="zero bytes"):
        new_store(zeros).close()


def test_creation_never_destroys_a_real_store_or_another_file(tmp_path):
    empty = str(tmp_path / "empty.uehist")
    new_store(empty).close()  # a complete store without steps
    full = str(tmp_path / "full.uehist")
    write_store(full, steps=3)
    other = str(tmp_path / "notes.txt")
    with open(other, "wb") as f:
        f.write(b"notes")  # short, and not a history file
    with open(str(tmp_path / "flipped.uehist"), "wb") as f:  # a real store with a damaged first frame
        data = bytearray(open(full, "rb").read())
        data[len(history_file.FILE_MAGIC) + 6] ^= 1
        f.write(data)
    for path in (empty, full, other, str(tmp_path / "flipped.uehist")):
        before = open(path, "rb").read()
        with pytest.raises(FileExistsError, match="overwrite=True"):
            new_store(path)
        assert open(path, "rb").read() == before
    store = new_store(full, overwrite=True)
    assert store.steps == [] and store.file.path == full
    store.close()
    assert HistoryStore.open(full).steps == []


def test_version_2_files_open_and_append(tmp_path, monkeypatch):
    path = str(tmp_path / "v2.uehist")
    with monkeypatch.context() as m:
        m.setattr(history_file, "FORMAT_VERSION", 2)
        truth = write_store(path, steps=7)
    assert open(path, "rb").read(8) == history_file.FILE_MAGIC_V1
    store = HistoryStore.open(path)
    check_reads(store, truth)
    record(store, [7])
    store.set_run_info(n=8)
    store.close()
    store = HistoryStore.open(path)
    assert store.file.file_header["version"] == 2 and store.steps == list(range(8)) and store.run_info == {"n": 8}


def test_version_2_middle_length_flip_is_corruption(tmp_path, monkeypatch):
    """Version-2 frames carry no checksum of their own and a store without delta fields marks no
    record as fsync'd; a damaged length with more whole records after it than a crash can damage
    (keyframe_every) is still corruption, not a crash cut."""
    path = str(tmp_path / "v2.uehist")
    with monkeypatch.context() as m:
        m.setattr(history_file, "FORMAT_VERSION", 2)
        store = HistoryStore({"g": FieldSpec(SHAPES, "int8")}, tier="disk", path=path, keyframe_every=5)
        for t in range(30):
            store.record(t, {"g": tensors(t)})
        store.close()
    e = offsets(path)[10]
    flip_bit(path, e.offset + 8 + 2, 4)  # payload_len
    size = os.path.getsize(path)
    with pytest.raises(ue.HistoryCorruptError, match="salvage=True"):
        HistoryStore.open(path)
    assert os.path.getsize(path) == size
    with pytest.warns(RuntimeWarning):
        assert HistoryStore.open(path, salvage=True).steps == list(range(10))


def test_a_cleanly_closed_store_has_no_unsynced_tail(tmp_path):
    """close() ends the file with an fsync'd mark: damage to the records after the last keyframe
    of a closed store is damage, refused (nothing truncated), not a crash silently cut back to the
    keyframe with a warning."""
    path = str(tmp_path / "h.uehist")
    truth = write_store(path, steps=13, keyframe_every=5)  # keyframe at 10, then 11, 12 and the mark
    e = offsets(path)[11]
    flip_bit(path, e.payload_offset + 5, 3)
    before = open(path, "rb").read()
    with pytest.raises(ue.HistoryCorruptError, match="salvage=True"):
        HistoryStore.open(path)
    assert open(path, "rb").read() == before
    with pytest.warns(RuntimeWarning, match="dropped"):
        salvaged = HistoryStore.open(path, salvage=True)
    assert salvaged.steps == list(range(11))
    check_reads(salvaged, truth)


def test_closing_twice_or_after_a_keyframe_adds_no_second_mark(tmp_path):
    path = str(tmp_path / "h.uehist")
    write_store(path, steps=11, keyframe_every=5)  # step 10 is a keyframe: already fsync'd
    size = os.path.getsize(path)
    store = HistoryStore.open(path)
    store.close()
    assert os.path.getsize(path) == size
