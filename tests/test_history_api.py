"""The history store's API for the history methods (Mini-Unlearning, DeltaGrad): products on
encoded fields, history bytes read, run metadata in the file, extra fields, and reads whose
tensors belong to the caller."""
import math
import os

import pytest
import torch

import unlearn_ext as ue
from unlearn_ext.history import EncodedField, FieldSpec, HistoryFormatError, HistoryStore
from unlearn_ext.history import file as history_file

ODD = [(33, 17), (17,), (5, 3, 4), (1,), (0,), (4099,)]  # short last blocks, a 1-element, an empty tensor
CODECS = ["int8", "int4", "nf4", "compand8", "fp16", "bf16", "fp32"]


def randn(shapes, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) * scale for s in shapes]


def make_store(tmp_path, tier, fields, **kw):
    return HistoryStore(fields, tier=tier, path=str(tmp_path / "h.uehist"), **kw)


def exact_dot(a, b) -> tuple[float, float]:
    """(<a, b> summed exactly, sum |a_i b_i|), over tensor lists, from float64 products (a product
    of two floats of <= 24 significant bits is exact in float64)."""
    prods = [x.double().reshape(-1) * y.double().reshape(-1) for x, y in zip(a, b)]
    flat = torch.cat(prods) if prods else torch.zeros(0, dtype=torch.float64)
    return math.fsum(flat.tolist()), float(flat.abs().sum())


# ---- encoded fields: products on the codes equal decode-then-dense --------------------------------

@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("block", [64, 256, 4096])
@pytest.mark.parametrize("tier", ["host", "disk"])
def test_encoded_dot_and_axpy_equal_decoded(tmp_path, codec, block, tier):
    store = make_store(tmp_path, tier, {"g": FieldSpec(ODD, codec)}, block_size=block)
    x = randn(ODD, 1, scale=3.0)
    store.record(0, {"g": x})
    dec = store.read(0).tensors["g"]
    enc = store.encoded(0, "g")
    assert isinstance(enc, EncodedField) and enc.codec == codec and enc.kind == "plain"
    assert enc.nbytes == store.report()[0]["bytes"] and enc.numel == sum(t.numel() for t in x)
    assert all(torch.equal(a, b) for a, b in zip(enc.decode(), dec))

    v = randn(ODD, 2)
    want, mag = exact_dot(dec, v)
    got = enc.dot(v)
    assert isinstance(got, float)
    # Rounding bounds: fp codecs are a float64 sum (n * 2^-53 relative to sum |d v|); int codecs
    # sum each block in float32 (block * 2^-24), then in float64.
    n = sum(t.numel() for t in v)
    bound = (n * 2.0**-53 if codec in ("fp32", "fp16", "bf16") else block * 2.0**-24) * mag
    assert abs(got - want) <= bound * 1.01 + 1e-300, (got, want, bound)

    # axpy_: one float32 multiply and one float32 add per element, exactly as decode-then-dense.
    alpha = -0.37
    y = randn(ODD, 3)
    dense = [t + torch.tensor(alpha, dtype=torch.float32) * d for t, d in zip(y, dec)]
    assert enc.axpy_(y, alpha) is not None
    assert all(torch.equal(a, b) for a, b in zip(y, dense))
    # ...and within two float32 roundings of the float64 result.
    for a, t0, d in zip(y, randn(ODD, 3), dec):
        exact = t0.double() + alpha * d.double()
        assert bool(((a.double() - exact).abs() <= 2.0**-23 * (t0.double().abs() + 2 * (alpha * d.double()).abs())
                     + 1e-45).all())


@pytest.mark.parametrize("codec", ["int8", "int4", "nf4", "compand8", "fp16"])
def test_encoded_products_take_half_precision_vectors(codec):
    store = HistoryStore({"g": FieldSpec(ODD, codec)})
    store.record(0, {"g": randn(ODD, 1)})
    dec = store.read(0).tensors["g"]
    for dtype in (torch.float16, torch.bfloat16):
        v = [t.to(dtype) for t in randn(ODD, 2)]
        want, mag = exact_dot(dec, v)
        assert abs(store.encoded(0, "g").dot(v) - want) <= 4096 * 2.0**-24 * mag + 1e-300
        y = [t.to(dtype) for t in randn(ODD, 3)]
        expect = [(t.float() + torch.tensor(0.5) * d).to(dtype) for t, d in zip(y, dec)]
        store.encoded(0, "g").axpy_(y, 0.5)
        assert all(torch.equal(a, b) for a, b in zip(y, expect))


def test_lbfgs_two_loop_on_codes_equals_dense():
    """The use DeltaGrad makes of it: an L-BFGS two-loop product with the stored gradient
    differences, run on the codes, equals the same recursion on the decoded vectors."""
    shapes = [(40, 7), (7,)]
    store = HistoryStore({"dg": FieldSpec(shapes, "int8"), "dw": FieldSpec(shapes, "int8")}, block_size=64)
    for t in range(4):
        dw = randn(shapes, 10 + t, scale=0.1)
        store.record(t, {"dw": dw, "dg": [w * 2.0 + n for w, n in zip(dw, randn(shapes, 50 + t, scale=0.01))]})
    q_codes = randn(shapes, 99)
    q_dense = [t.clone() for t in q_codes]
    for t in reversed(store.steps):
        dw, dg = store.encoded(t, "dw"), store.encoded(t, "dg")
        rho = 1.0 / dg.dot(dw.decode())
        a = rho * dw.dot(q_codes)
        dg.axpy_(q_codes, -a)
        s = store.read(t)
        rho_d = 1.0 / exact_dot(s.tensors["dg"], s.tensors["dw"])[0]
        a_d = rho_d * exact_dot(s.tensors["dw"], q_dense)[0]
        q_dense = [q - a_d * g for q, g in zip(q_dense, s.tensors["dg"])]
    for a, b in zip(q_codes, q_dense):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_encoded_refusals_name_the_problem():
    store = HistoryStore({"w": FieldSpec(ODD, "int8", delta=True), "g": FieldSpec(ODD, "fp16"),
                          "h": FieldSpec([(3,)], "int8")})
    store.record(0, {"w": randn(ODD, 0), "g": randn(ODD, 1)})
    with pytest.raises(ValueError, match=r"'w' is delta-encoded.*store.read\(step, \['w'\]\)"):
        store.encoded(0, "w")
    with pytest.raises(KeyError, match="unknown field 'x'"):
        store.encoded(0, "x")
    with pytest.raises(KeyError, match="step 0 did not record field 'h'"):
        store.encoded(0, "h")
    with pytest.raises(KeyError, match="step 1 was not recorded"):
        store.encoded(1, "g")
    enc = store.encoded(0, "g")
    with pytest.raises(ValueError, match="v has 2 tensors; the field has 6"):
        enc.dot(randn(ODD[:2], 0))
    with pytest.raises(ValueError, match=r"y\[1\] has shape \(18,\); the field's tensor 1 has shape \(17,\)"):
        enc.axpy_([torch.zeros(33, 17), torch.zeros(18)] + randn(ODD[2:], 0), 1.0)
    with pytest.raises(ValueError, match="alpha must be finite"):
        enc.axpy_(randn(ODD, 0), float("nan"))


# ---- history bytes read ---------------------------------------------------------------------------

def run_reads(store):
    """A fixed sequence of reads; returns bytes_read after each."""
    counts = []
    store.read(6)                                  # keyframe 5, delta 6, grads 6, ids 6
    counts.append(store.bytes_read)
    list(store.iter(7, 9, names=["params"]))       # deltas 7, 8 from the cache, ids 7, 8
    counts.append(store.bytes_read)
    store.encoded(3, "grads")
    counts.append(store.bytes_read)
    return counts


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_bytes_read_counts_payload_loaded(tmp_path, tier):
    store = make_store(tmp_path, tier, {"params": FieldSpec(ODD, "int8", delta=True),
                                        "grads": FieldSpec(ODD, "int4")}, keyframe_every=5)
    for t in range(10):
        store.record(t, {"params": randn(ODD, t), "grads": randn(ODD, 100 + t)}, batch_ids=torch.arange(4))
    assert store.bytes_read == 0  # recording is not reading
    size = {(t, k): s["bytes"] for t in range(10) for k, s in store.read(t).stats.items()}
    store.bytes_read, store._cache = 0, {}
    ids = 4 * 8
    want = [size[5, "params"] + size[6, "params"] + size[6, "grads"] + ids]
    want.append(want[-1] + size[7, "params"] + size[8, "params"] + 2 * ids)
    want.append(want[-1] + size[3, "grads"])
    assert run_reads(store) == want
    if tier == "disk":
        store.close()
        reopened = HistoryStore.open(store.file.path, writable=False)
        assert reopened.bytes_read == 0  # opening (and rebuilding the encoder) is not counted
        assert run_reads(reopened) == want


# ---- run metadata --------------------------------------------------------------------------------

def test_run_info_round_trips_and_updates(tmp_path):
    path = str(tmp_path / "h.uehist")
    store = HistoryStore({"g": FieldSpec(ODD, "int8")}, tier="disk", path=path,
                         run_info={"n": 1000, "batch_seed": 7})
    store.set_run_info(steps_per_epoch=10, note={"data": "digits", "ratios": [0.1, 0.2]})
    store.record(0, {"g": randn(ODD, 0)}, lr=0.1)
    store.set_run_info(n=990)  # later values replace earlier ones
    store.record(1, {"g": randn(ODD, 1)}, lrs=[0.05, 0.5])
    want = {"n": 990, "batch_seed": 7, "steps_per_epoch": 10, "note": {"data": "digits", "ratios": [0.1, 0.2]}}
    assert store.run_info == want
    info = store.run_info
    info["note"]["ratios"].append(1.0)  # a copy: the store does not change
    assert store.run_info == want
    store.close()
    reopened = HistoryStore.open(path)
    assert reopened.run_info == want and reopened.steps == [0, 1]
    assert reopened.read(0).lrs is None and reopened.read(0).lr == 0.1
    assert reopened.read(1).lrs == [0.05, 0.5] and reopened.read(1).lr == 0.05
    with pytest.raises(TypeError, match="run metadata 'model' is not JSON-serializable"):
        reopened.set_run_info(model=torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="'lr' is not JSON-serializable"):
        reopened.set_run_info(lr=float("nan"))
    reopened.close()
    with pytest.raises(RuntimeError, match="read-only"):
        HistoryStore.open(path, writable=False).set_run_info(n=1)


def test_run_info_record_cut_by_a_crash_is_dropped(tmp_path):
    path = str(tmp_path / "h.uehist")
    store = HistoryStore({"g": FieldSpec(ODD, "int8")}, tier="disk", path=path, run_info={"n": 10})
    store.record(0, {"g": randn(ODD, 0)})
    store.set_run_info(n=9)
    store.close()
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 3)
    with pytest.warns(RuntimeWarning, match="dropped"):
        reopened = HistoryStore.open(path)
    assert reopened.run_info == {"n": 10} and reopened.steps == [0]
    assert reopened.recovery.dropped_records == 1


def write_v1_file(path, monkeypatch):
    """A file of history format version 1: the writer of this build with the version set back is
    byte-identical to the previous build's (checked when version 2 was introduced)."""
    with monkeypatch.context() as m:
        m.setattr(history_file, "FORMAT_VERSION", 1)
        store = HistoryStore({"params": FieldSpec(ODD, "int8", delta=True), "grads": FieldSpec(ODD, "fp16")},
                             tier="disk", path=path, keyframe_every=3)
        for t in range(5):
            store.record(t, {"params": randn(ODD, t), "grads": randn(ODD, 10 + t)}, lr=0.1, batch_ids=[t])
        store.close()


def test_version_1_files_open_and_append(tmp_path, monkeypatch):
    path = str(tmp_path / "v1.uehist")
    write_v1_file(path, monkeypatch)
    store = HistoryStore.open(path)
    assert store.file.file_header["version"] == 1 and store.run_info == {}
    s = store.read(4)
    assert s.lr == 0.1 and s.lrs is None and s.batch_ids.tolist() == [4]
    assert store.encoded(4, "grads").dot(s.tensors["grads"]) > 0
    with pytest.raises(HistoryFormatError, match="version 1, which has no run metadata"):
        store.set_run_info(n=5)
    store.record(5, {"params": randn(ODD, 5)}, lrs=[0.1, 0.2])  # steps still append
    store.close()
    assert HistoryStore.open(path).read(5).lrs == [0.1, 0.2]


def test_unknown_versions_and_record_kinds_are_refused(tmp_path, monkeypatch):
    path = str(tmp_path / "v4.uehist")
    with monkeypatch.context() as m:
        m.setattr(history_file, "FORMAT_VERSION", 4)
        HistoryStore({"g": FieldSpec(ODD, "int8")}, tier="disk", path=path).close()
    with pytest.raises(HistoryFormatError, match="version 4; this build reads 'unlearn_ext.history' versions 1, 2, 3"):
        HistoryStore.open(path)
    path = str(tmp_path / "kind.uehist")
    store = HistoryStore({"g": FieldSpec(ODD, "int8")}, tier="disk", path=path)
    store.file._append({"kind": "comment"}, [], sync=True, index=False)
    store.close()
    with pytest.raises(HistoryFormatError, match="has kind 'comment'"):
        HistoryStore.open(path)


# ---- the recorder: every param group, hyperparameters, extra fields ----------------------------------

def grouped_training(tmp_path, steps=6, anchors=None, attach_at=()):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    model[0].bias.requires_grad_(False)  # a frozen tensor: not recorded, left out of param_indices
    opt = torch.optim.SGD([{"params": [model[0].weight, model[0].bias], "lr": 0.1, "weight_decay": 1e-3},
                           {"params": model[2].parameters(), "weight_decay": 0.0}],
                          lr=0.02, momentum=0.9, dampening=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda e: 0.5 ** e, lambda e: 1.0])
    store = HistoryStore.for_model(model, params="int8", grads="fp32", extra={"full_grad": "fp32"},
                                   tier="disk", path=str(tmp_path / "h.uehist"), keyframe_every=4)
    recorder = ue.HistoryRecorder(store, model, opt, steps=anchors, steps_per_epoch=3, batch_seed=11, n=24,
                                  run_info={"loss": "cross_entropy"})
    seen = {}
    for t in range(steps):
        x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        if t in attach_at:
            full = [p.grad * 2 for p in model.parameters() if p.requires_grad]
            recorder.attach(full_grad=full)
            seen[t] = full
        opt.step()
        sched.step()
    recorder.remove()
    store.close()
    return HistoryStore.open(store.file.path), seen


def test_recorder_records_every_param_group(tmp_path):
    store, _ = grouped_training(tmp_path)
    for t in range(6):
        s = store.read(t)
        assert s.lrs == [0.1 * 0.5 ** t, 0.02] and s.lr == s.lrs[0]
    info = store.run_info
    assert info["optimizer"] == "SGD" and info["lrs"] == [0.1, 0.02]
    assert (info["steps_per_epoch"], info["batch_seed"], info["n"], info["loss"]) == (3, 11, 24, "cross_entropy")
    assert info["momentum"] == 0.9 and info["dampening"] == 0.1 and info["nesterov"] is False
    assert "weight_decay" not in info and "lr" not in info  # the groups differ: read param_groups
    g0, g1 = info["param_groups"]
    assert (g0["lr"], g0["weight_decay"], g0["momentum"]) == (0.1, 1e-3, 0.9)
    assert (g1["lr"], g1["weight_decay"]) == (0.02, 0.0)
    assert g0["param_indices"] == [0] and g1["param_indices"] == [1, 2]  # positions in the recorded lists


def test_recorder_attach_and_for_model_extra_fields(tmp_path):
    store, seen = grouped_training(tmp_path, anchors={0, 3}, attach_at=(3, 5))
    assert store.steps == [0, 3, 5]  # an attached field records its step even outside `steps`
    assert set(store.read(0).tensors) == {"params", "grads"}
    for t in (3, 5):
        got = store.read(t).tensors
        assert set(got) == {"params", "grads", "full_grad"}
        assert all(torch.equal(a, b) for a, b in zip(got["full_grad"], seen[t]))
        assert store.encoded(t, "full_grad").codec == "fp32"
    with pytest.raises(ValueError, match="'grads' is recorded by the hook itself"):
        ue.HistoryRecorder(HistoryStore.for_model(torch.nn.Linear(2, 2)), torch.nn.Linear(2, 2),
                           torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)).attach(grads=[])


def test_for_model_extra_specs():
    model = torch.nn.Linear(4, 3)
    store = HistoryStore.for_model(model, grads=None, extra={
        "full_grad": "fp16", "stats": ([(10,), torch.zeros(2, 2)], "int4"),
        "anchor": FieldSpec([(4, 3)], "int8", delta=True)})
    assert store.fields["full_grad"] == FieldSpec([(3, 4), (3,)], "fp16")
    assert store.fields["stats"] == FieldSpec([(10,), (2, 2)], "int4")
    assert store.fields["anchor"].delta and set(store.fields) == {"params", "full_grad", "stats", "anchor"}
    with pytest.raises(ValueError, match="extra field 'params' clashes"):
        HistoryStore.for_model(model, extra={"params": "fp32"})
    with pytest.raises(TypeError, match="extra field 'x': expected a codec"):
        HistoryStore.for_model(model, extra={"x": 3})


def test_recorder_on_a_version_1_file_warns_and_records(tmp_path, monkeypatch):
    path = str(tmp_path / "v1.uehist")
    model = torch.nn.Linear(3, 2)
    with monkeypatch.context() as m:
        m.setattr(history_file, "FORMAT_VERSION", 1)
        HistoryStore.for_model(model, tier="disk", path=path).close()
    store = HistoryStore.open(path, expect=model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning, match="run metadata not recorded"):
        recorder = ue.HistoryRecorder(store, model, opt)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    recorder.remove()
    assert store.read(0).lrs == [0.1]


# ---- reads give the caller its own tensors --------------------------------------------------------

@pytest.mark.parametrize("tier", ["host", "disk"])
def test_iter_tensors_do_not_alias_the_store(tmp_path, tier):
    store = make_store(tmp_path, tier, {"params": FieldSpec(ODD, "int4", delta=True),
                                        "grads": FieldSpec(ODD, "fp32")}, keyframe_every=4)
    for t in range(10):
        store.record(t, {"params": randn(ODD, t), "grads": randn(ODD, 50 + t)}, batch_ids=[t, t + 1])
    truth = {t: store.read(t) for t in range(10)}
    store._cache = {}
    seen = []
    for s in store.iter():
        cached = store._cache["params"][1]
        assert not any(a.numel() and a.data_ptr() == c.data_ptr() for a, c in zip(s.tensors["params"], cached))
        for name in s.tensors:
            for a in s.tensors[name]:
                a.add_(1000.0)  # the caller changes what it got...
        s.batch_ids.add_(1000)
        seen.append(s.step)
    assert seen == list(range(10))
    for t in (9, 3, 4, 5):  # ...and no later read, from the cache or not, sees it
        s = store.read(t)
        for name in s.tensors:
            assert all(torch.equal(a, b) for a, b in zip(s.tensors[name], truth[t].tensors[name]))
        assert s.batch_ids.tolist() == [t, t + 1]


def test_iter_range_bounds():
    store = HistoryStore({"g": FieldSpec([(2,)], "fp32")})
    for t in (0, 2, 5, 9):
        store.record(t, {"g": [torch.full((2,), float(t))]})
    assert [s.step for s in store.iter(2, 9)] == [2, 5]
    assert [s.step for s in store.iter(3)] == [5, 9] and [s.step for s in store.iter(stop=1)] == [0]
    assert [s.step for s in store.iter(10)] == []
