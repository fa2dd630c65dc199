"""The compressed history store (docs/design.md §5 and 10): codec error bounds, closed-loop versus
open-loop deltas over thousands of steps, the disk format (crash recovery, corruption, foreign
files, no pickle, reads that seek), tiers, the recorder hook and the byte estimate."""
import io
import os
import pickle

import pytest
import torch

import unlearn_ext as ue
from unlearn_ext import ops as _ops
from unlearn_ext.history import codecs as hc, file as history_file
from unlearn_ext.history import FieldSpec, HistoryStore

SHAPES = [(33, 17), (17,), (5, 3, 4)]


def tensors(seed, scale=1.0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=gen) * scale).to(dtype) for s in SHAPES]


def blockwise_bound(x, codec, block):
    """Per-element bound of the quantized codecs: fraction * absmax + 2^-22 absmax per block, where
    the fraction is the codebook's covering radius (int8/int4: half a step, 0.5 / qmax; nf4: the
    distance from -1 to its lowest level -0.8; compand8: half its largest gap), computed from the
    levels by the reference."""
    q = 1.0 / hc.max_error_fraction(codec) / 2
    out = []
    for t in x:
        flat = t.reshape(-1).float()
        pad = (-flat.numel()) % block
        absmax = torch.nn.functional.pad(flat.abs(), (0, pad)).reshape(-1, block).amax(1)
        per = absmax.repeat_interleave(block)[: flat.numel()]
        out.append((per / q / 2 + per * 2**-22).reshape(t.shape))
    return out


# ---- codecs round-trip within their stated bounds ------------------------------------------------

@pytest.mark.parametrize("codec", ["fp32", "fp16", "bf16", "int8", "int4", "nf4", "compand8"])
@pytest.mark.parametrize("block", [64, 256])
def test_codec_round_trip_within_bound(codec, block):
    store = HistoryStore({"g": FieldSpec(SHAPES, codec)}, block_size=block)
    x = tensors(1, scale=3.0)
    stats = store.record(0, {"g": x})["g"]
    got = store.read(0).tensors["g"]
    if codec == "fp32":
        bound = [torch.zeros_like(t) for t in x]
    elif codec in ("fp16", "bf16"):
        rel = 2.0**-11 if codec == "fp16" else 2.0**-8  # half an ulp, relative
        bound = [t.abs() * rel for t in x]
    else:
        bound = blockwise_bound(x, codec, block)
    worst = 0.0
    for g, t, b in zip(got, x, bound):
        assert g.shape == t.shape and g.dtype == torch.float32
        err = (g - t).abs()
        assert bool((err <= b).all()), f"{codec}: error {float((err - b).max())} above the bound"
        worst = max(worst, float(err.max()))
    assert stats["max_err"] == pytest.approx(worst, rel=1e-12, abs=0)
    raw = sum(t.numel() for t in x) * 4
    assert stats["raw_bytes"] == raw
    if codec == "fp32":
        assert stats["max_err"] == 0.0
    # Compression ratio versus fp32 (docs/design.md §5: int8 >= 3.9x, int4 >= 7.5x for block 256).
    want = {"fp32": 1.0, "fp16": 2.0, "bf16": 2.0}.get(codec)
    if want is not None:
        assert raw / stats["bytes"] == want
    elif block == 256:
        big = HistoryStore({"g": FieldSpec([(1024, 512)], codec)})
        big.record(0, {"g": [torch.randn(1024, 512)]})
        assert big.compression_ratio() >= (3.9 if hc.BITS[codec] == 8 else 7.5)


# ---- closed-loop deltas stay bounded; open-loop ones drift -----------------------------------------

@pytest.mark.parametrize("codec", ["int8", "int4", "nf4", "compand8"])
def test_closed_loop_bounded_open_loop_drifts(codec):
    """A random-walk trajectory over 3000 steps with one keyframe. Closed loop: every step's error
    is within one quantization step of that step's delta. Open loop (quantize w_t - w_{t-1} and
    sum the decoded deltas) accumulates rounding errors like a random walk."""
    bits, levels, steps, block = hc.BITS[codec], hc.LEVELS[codec], 3000, 256
    shapes = [(4000,), (300,)]
    store = HistoryStore({"w": FieldSpec(shapes, codec, delta=True)}, keyframe_every=10**6, block_size=block)
    gen = torch.Generator().manual_seed(0)
    w = [torch.randn(s, generator=gen) for s in shapes]
    open_recon = [t.clone() for t in w]
    closed_worst = open_worst = 0.0
    prev = [t.clone() for t in w]
    for t in range(steps):
        if t:
            w = [x - 1e-3 * torch.randn(x.shape, generator=gen) for x in w]  # an SGD-like step
        stats = store.record(t, {"w": w})["w"]
        if t:
            # Bound of this step: one quantization step of the delta the encoder saw, which is the
            # true step plus the previous reconstruction error (itself within the bound).
            step_delta = [a - b for a, b in zip(w, prev)]
            bound = max(float(b.max()) for b in blockwise_bound(step_delta, codec, block)) * 2.5
            assert stats["max_err"] <= bound, (t, stats["max_err"], bound)
            closed_worst = max(closed_worst, stats["max_err"])
            # Open loop: encode the true delta, add its dequantized value.
            codes, scales = _ops.blockwise_quantize(step_delta, bits, block, levels)
            _ops.dequantize_axpy_(open_recon, 1.0, codes, scales, bits, block, levels)
            open_worst = max(open_worst, max(float((a - b).abs().max()) for a, b in zip(open_recon, w)))
        prev = [x.clone() for x in w]
    # What the decoder reads back is the encoder's reconstruction, bit for bit: the error reported
    # at record time is the error of store.read.
    last = store.read(steps - 1).tensors["w"]
    assert max(float((a - b).abs().max()) for a, b in zip(last, w)) == stats["max_err"]
    assert open_worst > 5 * closed_worst, (open_worst, closed_worst)


def test_keyframes_are_exact_and_reads_are_bounded():
    store = HistoryStore({"w": FieldSpec(SHAPES, "int8", delta=True)}, keyframe_every=4)
    truth = []
    for t in range(11):
        truth.append(tensors(100 + t))
        store.record(10 * t, {"w": truth[-1]})
    kinds = [r["kind"] for r in store.report()]
    assert kinds == ["keyframe", "delta", "delta", "delta"] * 2 + ["keyframe", "delta", "delta"]
    for t in (0, 4, 8):
        assert all(torch.equal(a, b) for a, b in zip(store.read(10 * t).tensors["w"], truth[t]))
    # Reading out of order and iterating give the same bits.
    backwards = {t: store.read(10 * t).tensors["w"] for t in reversed(range(11))}
    forwards = {s.step // 10: s.tensors["w"] for s in store.iter()}
    for t in range(11):
        assert all(torch.equal(a, b) for a, b in zip(backwards[t], forwards[t]))
    assert [s.step for s in store.iter(20, 50)] == [20, 30, 40]


# ---- the disk tier --------------------------------------------------------------------------------

def write_disk_store(path, steps=20, keyframe_every=5, codec="int8", crashed=False):
    """crashed: the file as a process that died after its last record leaves it (never closed)."""
    store = HistoryStore({"params": FieldSpec(SHAPES, codec, delta=True), "grads": FieldSpec(SHAPES, codec)},
                         tier="disk", path=path, keyframe_every=keyframe_every)
    truth = {}
    for t in range(steps):
        p, g = tensors(t), tensors(1000 + t, scale=1e-2)
        store.record(t, {"params": p, "grads": g}, lr=0.1 / (t + 1), batch_ids=torch.arange(t, t + 8))
        truth[t] = store.read(t)
    image = open(path, "rb").read()
    store.close()
    if crashed:
        with open(path, "wb") as f:
            f.write(image)
    return truth


def same_record(a, b):
    assert a.step == b.step and a.lr == b.lr and torch.equal(a.batch_ids, b.batch_ids)
    for name in a.tensors:
        assert all(torch.equal(x, y) for x, y in zip(a.tensors[name], b.tensors[name]))


@pytest.mark.parametrize("codec", ["int8", "nf4", "compand8"])
def test_disk_round_trip_and_reopen(tmp_path, codec):
    path = str(tmp_path / "h.uehist")
    truth = write_disk_store(path, codec=codec)
    store = HistoryStore.open(path)
    assert store.recovery.dropped_bytes == 0 and store.steps == list(range(20))
    for t in (0, 7, 19, 3):
        same_record(store.read(t), truth[t])
    assert truth[7].lr == 0.1 / 8 and truth[7].batch_ids.dtype == torch.int64
    assert truth[7].batch_ids.tolist() == list(range(7, 15))
    # Appending after a reopen continues the delta chain from the decoded reconstruction.
    p = tensors(20)
    stats = store.record(20, {"params": p})
    got = store.read(20).tensors["params"]
    assert max(float((a - b).abs().max()) for a, b in zip(got, p)) == stats["params"]["max_err"]
    store.close()
    assert HistoryStore.open(path).steps == list(range(21))


@pytest.mark.parametrize("cut", [1, 10, 30, 200])
def test_truncated_file_reopens_at_last_whole_record(tmp_path, cut):
    path = str(tmp_path / "h.uehist")
    truth = write_disk_store(path, crashed=True)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - cut)  # a crash in the middle of writing the last record
    with pytest.warns(RuntimeWarning, match="dropped"):
        store = HistoryStore.open(path)
    assert store.steps == list(range(19))
    last_whole = os.path.getsize(path)
    assert store.recovery.dropped_records == 1
    assert store.recovery.dropped_bytes == size - cut - last_whole > 0
    same_record(store.read(18), truth[18])
    store.record(19, {"params": tensors(19)})  # the file takes appends again
    store.close()
    assert HistoryStore.open(path).steps == list(range(20))


def test_zero_filled_tail_is_dropped(tmp_path):
    """After a power loss a file can end in zeros where the last record should be."""
    path = str(tmp_path / "h.uehist")
    write_disk_store(path, steps=6)
    with open(path, "ab") as f:
        f.write(b"\0" * 1000)
    with pytest.warns(RuntimeWarning):
        store = HistoryStore.open(path)
    assert store.steps == list(range(6)) and store.recovery.dropped_bytes == 1000


def test_torn_last_header_is_dropped(tmp_path):
    """A crash can leave the last record's header bytes zeroed (an unwritten page) at full length."""
    path = str(tmp_path / "h.uehist")
    write_disk_store(path, steps=6)
    with HistoryStore.open(path) as store:
        last = store._entries[-1].file_entry
    with open(path, "r+b") as f:
        f.seek(last.offset + history_file.FRAME.size)
        f.write(b"\0" * 16)
    with pytest.warns(RuntimeWarning, match="header checksum"):
        store = HistoryStore.open(path)
    assert store.steps == list(range(5)) and store.recovery.dropped_records == 1


def test_expecting_a_model_checks_shapes_not_default_codecs(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Linear(3, 2))
    path = str(tmp_path / "h.uehist")
    with HistoryStore.for_model(model, params="fp32", grads=None, tier="disk", path=path) as store:
        store.record(0, {"params": [p.detach() for p in model.parameters()]})
    assert HistoryStore.open(path, expect=model).steps == [0]
    with pytest.raises(ue.HistoryFormatError, match="another model"):
        HistoryStore.open(path, expect=torch.nn.Linear(5, 3))


def test_failed_encode_stops_recording(monkeypatch):
    """If one field of a step fails after another was encoded, the delta encoder has moved on: the
    store must stop rather than record deltas against a step it does not have."""
    store = HistoryStore({"w": FieldSpec(SHAPES, "int8", delta=True), "g": FieldSpec(SHAPES, "int8")})
    store.record(0, {"w": tensors(0), "g": tensors(1)})
    real = store._encode

    def failing(name, ts):
        if name == "g":
            raise MemoryError("out of memory")
        return real(name, ts)
    monkeypatch.setattr(store, "_encode", failing)
    with pytest.raises(MemoryError):
        store.record(1, {"w": tensors(2), "g": tensors(3)})
    monkeypatch.setattr(store, "_encode", real)
    with pytest.raises(RuntimeError, match="cannot record any more"):
        store.record(2, {"w": tensors(4), "g": tensors(5)})
    assert store.steps == [0]


def test_corrupted_payload_is_detected(tmp_path):
    path = str(tmp_path / "h.uehist")
    write_disk_store(path)
    store = HistoryStore.open(path)
    entry = store._entries[12].file_entry
    store.close()
    with open(path, "r+b") as f:  # flip one byte inside step 12's payload
        f.seek(entry.payload_offset + entry.payload_len // 2)
        b = f.read(1)
        f.seek(-1, io.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x40]))
    store = HistoryStore.open(path)
    with pytest.raises(ue.HistoryCorruptError, match="step 12.*checksum"):
        store.read(12)
    store.read(9)  # records before it (and after the next keyframe) stay readable
    store.read(16)


def test_corrupted_header_is_detected(tmp_path):
    path = str(tmp_path / "h.uehist")
    write_disk_store(path)
    store = HistoryStore.open(path)
    entry = store._entries[5].file_entry
    store.close()
    with open(path, "r+b") as f:
        f.seek(entry.offset + history_file.FRAME.size + 3)
        f.write(b"#")
    with pytest.raises(ue.HistoryCorruptError, match="header .* checksum"):
        HistoryStore.open(path)


def test_foreign_files_are_refused(tmp_path):
    path = str(tmp_path / "h.uehist")
    write_disk_store(path, steps=3)
    other = [(33, 18), (17,), (5, 3, 4)]
    with pytest.raises(ue.HistoryFormatError, match=r"another model: field 'params'\[0\] has shape \(33, 17\)"):
        HistoryStore.open(path, expect={"params": FieldSpec(other, "int8", True), "grads": FieldSpec(other)})
    with pytest.raises(ue.HistoryFormatError, match="codec 'int8'.*expected 'int4'"):
        HistoryStore.open(path, expect={"params": FieldSpec(SHAPES, "int4", True), "grads": FieldSpec(SHAPES)})
    model = torch.nn.Linear(4, 2)
    with pytest.raises(ue.HistoryFormatError, match="another model"):
        HistoryStore.open(path, expect=model)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"PK\x03\x04 not a history file")
    with pytest.raises(ue.HistoryFormatError, match="not an unlearn_ext history file"):
        HistoryStore.open(str(junk))
    with pytest.raises(FileExistsError):  # creating never overwrites
        HistoryStore({"g": FieldSpec(SHAPES)}, tier="disk", path=path)


def test_loading_never_unpickles(tmp_path, monkeypatch):
    path = str(tmp_path / "h.uehist")
    truth = write_disk_store(path, steps=6)

    def refuse(*a, **k):
        raise AssertionError("the history file loader must not unpickle")
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    store = HistoryStore.open(path)
    same_record(store.read(5), truth[5])
    assert b"\x80\x04" not in open(path, "rb").read()[:64]  # no pickle protocol header up front


class CountingFile:
    """Wraps a file object and counts the bytes read through it."""
    total = 0

    def __init__(self, f):
        self._f = f

    def read(self, n=-1):
        data = self._f.read(n)
        CountingFile.total += len(data)
        return data

    def __getattr__(self, name):
        return getattr(self._f, name)


def test_reading_one_step_does_not_read_the_file(tmp_path, monkeypatch):
    path = str(tmp_path / "h.uehist")
    keyframe_every = 5
    store = HistoryStore({"params": FieldSpec([(256, 256)], "int8", delta=True),
                          "grads": FieldSpec([(256, 256)], "int8")}, tier="disk", path=path,
                         keyframe_every=keyframe_every)
    for t in range(100):
        store.record(t, {"params": [torch.randn(256, 256)], "grads": [torch.randn(256, 256)]})
    store.close()
    size = os.path.getsize(path)
    real_open = history_file._open_binary
    monkeypatch.setattr(history_file, "_open_binary", lambda *a: CountingFile(real_open(*a)))
    CountingFile.total = 0
    store = HistoryStore.open(path, writable=False)
    opened = CountingFile.total
    # Opening scans frames and headers, plus the last record's payload (crash check) and the
    # decode of the encoder state: at most a keyframe interval of records.
    record = store._entries[50].file_entry.payload_len
    assert opened < (keyframe_every + 1) * record + 100 * 4096, (opened, size)
    CountingFile.total = 0
    store.read(63)  # keyframe 60, deltas 61..63
    both = CountingFile.total
    assert both <= 4 * record, (both, record)
    assert both < size / 20
    # Sections are checksummed one by one: a parameter chain does not read the gradients.
    store._cache.clear()
    CountingFile.total = 0
    store.read(63, names=["params"])
    sections = {name: nbytes for name, _, nbytes, _ in store._entries[61].file_entry.header["sections"]}
    keyframe = {name: nbytes for name, _, nbytes, _ in store._entries[60].file_entry.header["sections"]}
    assert CountingFile.total == keyframe["params"] + 3 * sections["params"]
    assert both == CountingFile.total + sections["grads"]  # and with grads: only step 63's
    with pytest.raises(RuntimeError, match="read-only"):  # and it refuses to record
        store.record(100, {"params": [torch.randn(256, 256)], "grads": [torch.randn(256, 256)]})


# ---- tiers, recorder, estimate ---------------------------------------------------------------------

@pytest.mark.parametrize("tier", ["device", "host", "disk"])
def test_tiers(tmp_path, tier):
    store = HistoryStore({"w": FieldSpec(SHAPES, "int8", delta=True)}, tier=tier,
                         path=str(tmp_path / "h.uehist"), keyframe_every=3)
    for t in range(5):
        store.record(t, {"w": tensors(t)})
    arrays = [a for e in store._entries for enc in e.fields.values() for a in enc.arrays]
    if tier == "disk":
        assert arrays == [] and os.path.getsize(store.file.path) > store.nbytes
    else:
        assert arrays and all(a.device.type == "cpu" for a in arrays)  # CPU tensors here
        if tier == "host":
            assert all(a.is_pinned() == torch.cuda.is_available() for a in arrays)
    got = store.read(4).tensors["w"]
    assert max(float((a - b).abs().max()) for a, b in zip(got, tensors(4))) == store.report()[4]["max_err"]


def tiny_training(store_kw, steps=30, anchors=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    store = HistoryStore.for_model(model, **store_kw)
    recorder = ue.HistoryRecorder(store, model, opt, steps=anchors)  # the one line
    seen = []
    for t in range(steps):
        x, y = torch.randn(8, 10), torch.randint(0, 3, (8,))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        seen.append(([p.detach().clone() for p in model.parameters()],
                     [p.grad.clone() for p in model.parameters()], opt.param_groups[0]["lr"]))
        recorder.batch(torch.arange(8) + 8 * t)
        opt.step()
        sched.step()
    recorder.remove()
    return model, store, seen


def test_recorder_hook(tmp_path):
    model, store, seen = tiny_training(dict(params="int8", grads="int8", keyframe_every=8))
    assert store.steps == list(range(30))
    for t in (0, 9, 10, 29):
        s = store.read(t)
        params, grads, lr = seen[t]
        assert s.lr == lr and s.batch_ids.tolist() == list(range(8 * t, 8 * t + 8))
        for got, want, b in zip(s.tensors["grads"], grads, blockwise_bound(grads, "int8", 256)):
            assert bool(((got - want).abs() <= b).all())
        err = max(float((a - b).abs().max()) for a, b in zip(s.tensors["params"], params))
        assert err == s.stats["params"]["max_err"] and err < 1e-2
        if t % 8 == 0:
            assert err == 0.0  # keyframe
    # Anchors: only the chosen steps are recorded, each with params and grads.
    _, anchors, seen = tiny_training(dict(params="fp32", grads="fp32"), anchors={0, 10, 20})
    assert anchors.steps == [0, 10, 20]
    s = anchors.read(20)
    assert all(torch.equal(a, b) for a, b in zip(s.tensors["params"], seen[20][0]))
    assert all(torch.equal(a, b) for a, b in zip(s.tensors["grads"], seen[20][1]))


def test_estimate_bytes_matches_actual(tmp_path):
    path = str(tmp_path / "h.uehist")
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    steps, k = 40, 8
    est = ue.estimate_bytes(model, steps, {"params": "int8", "grads": "int4"}, keyframe_every=k, batch_size=8)
    store = HistoryStore.for_model(model, params="int8", grads="int4", keyframe_every=k, tier="disk", path=path)
    for t in range(steps):
        store.record(t, {"params": [p.detach() + 1e-3 * t for p in model.parameters()],
                         "grads": [torch.randn_like(p) for p in model.parameters()]},
                     lr=0.1, batch_ids=torch.arange(8))
    store.close()
    assert est["payload"] == store.nbytes + steps * 8 * 8
    actual = os.path.getsize(path)
    assert abs(est["total"] - actual) / actual < 0.05, (est, actual)
    assert est["fp32"] == store.raw_nbytes


def test_bad_records_have_messages():
    store = HistoryStore({"w": FieldSpec(SHAPES, "int8")})
    with pytest.raises(KeyError, match="unknown field 'v'"):
        store.record(0, {"v": tensors(0)})
    with pytest.raises(ValueError, match=r"field 'w'\[1\]: shape \(18,\)"):
        store.record(0, {"w": [torch.zeros(33, 17), torch.zeros(18), torch.zeros(5, 3, 4)]})
    bad = tensors(0)
    bad[2][1, 1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"step 0: field 'w'\[2\] holds NaN or Inf"):
        store.record(0, {"w": bad})
    store.record(3, {"w": tensors(0)})
    with pytest.raises(ValueError, match="steps must increase"):
        store.record(3, {"w": tensors(0)})
    with pytest.raises(KeyError, match="step 4 was not recorded"):
        store.read(4)
    with pytest.raises(ValueError, match=r"delta encoding needs a quantized codec \(int8, int4, nf4, compand8\)"):
        FieldSpec(SHAPES, "fp16", delta=True)
    with pytest.raises(ValueError, match="unknown codec 'int2'"):
        FieldSpec(SHAPES, "int2")
    skipping = HistoryStore({"w": FieldSpec(SHAPES, "int8")}, nonfinite="skip")
    assert skipping.record(0, {"w": bad}) is None and skipping.skipped_steps == [0] and len(skipping) == 0


def test_reference_backend_writes_the_same_bytes(monkeypatch):
    """The pure-PyTorch fallback encodes exactly like the kernels (codes, scales, reconstruction)."""
    if not ue.compiled():
        pytest.skip("needs the compiled extension to compare with")

    def run():
        store = HistoryStore({"w": FieldSpec(SHAPES, "int4", delta=True), "g": FieldSpec(SHAPES, "int8")},
                             keyframe_every=4)
        for t in range(6):
            store.record(t, {"w": tensors(t), "g": tensors(50 + t)})
        return [a for e in store._entries for enc in e.fields.values() for a in enc.arrays]
    compiled = run()
    monkeypatch.setattr(_ops.loader, "_C", None)
    monkeypatch.setattr(_ops.loader, "_warned", True)
    fallback = run()
    assert len(compiled) == len(fallback)
    assert all(torch.equal(a, b) for a, b in zip(compiled, fallback))


def test_failed_write_stops_recording(tmp_path, monkeypatch):
    """A write that fails (disk full) leaves the encoder ahead of the file: the store refuses to
    record more, and reopening continues from the last whole record."""
    path = str(tmp_path / "h.uehist")
    store = HistoryStore({"w": FieldSpec(SHAPES, "int8", delta=True)}, tier="disk", path=path, keyframe_every=3)
    for t in range(4):
        store.record(t, {"w": tensors(t)})

    def full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(store.file, "append", full)
    with pytest.raises(OSError, match="No space"):
        store.record(4, {"w": tensors(4)})
    with pytest.raises(RuntimeError, match="cannot record any more: writing step 4 failed"):
        store.record(5, {"w": tensors(5)})
    store.close()
    reopened = HistoryStore.open(path)
    assert reopened.steps == [0, 1, 2, 3]
    stats = reopened.record(4, {"w": tensors(4)})
    got = reopened.read(4).tensors["w"]
    assert max(float((a - b).abs().max()) for a, b in zip(got, tensors(4))) == stats["w"]["max_err"]


def test_anchor_fields_reopen(tmp_path):
    """Fields recorded at different steps (anchors): reopening rebuilds each field's encoder state
    from that field's own last record."""
    path = str(tmp_path / "h.uehist")
    store = HistoryStore({"w": FieldSpec(SHAPES, "int8", delta=True), "g": FieldSpec(SHAPES, "fp16")},
                         tier="disk", path=path, keyframe_every=4)
    for t in range(6):
        store.record(t, {"w": tensors(t)} if t < 5 else {"g": tensors(t)})
    store.close()
    store = HistoryStore.open(path)
    assert set(store.read(5).tensors) == {"g"} and set(store.read(4).tensors) == {"w"}
    store.record(6, {"w": tensors(6)})
    got = store.read(6).tensors["w"]
    assert max(float((a - b).abs().max()) for a, b in zip(got, tensors(6))) == store.report()[-1]["max_err"]


def test_reading_no_fields_decodes_none(monkeypatch):
    """read(step, names=[]) gives the step's lr and batch ids without decoding any field (a reader
    that wants only the schedule must not pay for every field: it used to decode them all)."""
    store = HistoryStore({"params": FieldSpec(SHAPES, "int8"), "grads": FieldSpec(SHAPES, "fp32")})
    for t in range(3):
        store.record(t, {"params": tensors(t), "grads": tensors(10 + t)}, lr=0.1, batch_ids=torch.arange(t, t + 4))
    whole = store.read(1)
    assert set(whole.tensors) == {"params", "grads"}

    def no_decoding(*args, **kwargs):
        raise AssertionError("a field was decoded")
    monkeypatch.setattr(store, "_decode_field", no_decoding)
    for s, t in zip(store.iter(names=[]), range(3)):
        assert s.tensors == {} and s.lr == 0.1 and s.batch_ids.tolist() == list(range(t, t + 4))
