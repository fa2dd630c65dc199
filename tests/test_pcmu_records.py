"""PCMU step records (records.py): the sparse and dense layouts of the fragile set answer every
question the same way (values, radii, certificate counts, per-request checks, first divergent
step), analytic radii recomputed from the values equal the kernel's, the bytes reported are the
bytes held, and records saved in the earlier format still load."""
import io

import pytest
import torch

from unlearn_ext import ops as _ops
from unlearn_ext.pcmu import analytic_threshold, smooth_quantize
from unlearn_ext.pcmu.records import DENSE, SPARSE, FragileSet, PCMUStep, estimate_record_bytes

from pcmu_settings import digits_trainer, first_difference

TAU, SIGMA = 0.006, 0.01
BETA = analytic_threshold(TAU, SIGMA)


def _step_outputs(mode, sizes=(37, 1, 250, 0, 3), seed=5):
    """Values shaped like a model's tensors (odd sizes, one empty) and their smoothing radii."""
    gen = torch.Generator().manual_seed(seed)
    values = [torch.randn(s, generator=gen) * 0.02 for s in sizes]
    result = smooth_quantize(values, tau=TAU, sigma=SIGMA, mode=mode, seed=seed)
    return values, result.radii


def _same_reads(a: FragileSet, b: FragileSet):
    assert torch.equal(a.indices(), b.indices())
    assert torch.equal(a.values(), b.values())
    assert torch.equal(a.radii(), b.radii())
    bounds = [0.0, 0.004, 0.011, 0.02, 1.0]
    assert a.count_below(bounds) == b.count_below(bounds)
    assert a.count == b.count


@pytest.mark.parametrize("mode", ["analytic", "mc"])
@pytest.mark.parametrize("threshold", [0.0, 0.005, 0.02, 10.0])
def test_layouts_read_the_same_as_the_compaction_kernel(mode, threshold):
    values, radii = _step_outputs(mode)
    beta = BETA if mode == "analytic" else None
    sparse = FragileSet.record(values, radii, threshold, beta=beta, layout=SPARSE)
    dense = FragileSet.record(values, radii, threshold, beta=beta, layout=DENSE)
    assert (sparse.layout, dense.layout) == (SPARSE, DENSE)
    _same_reads(sparse, dense)
    index, value, radius = _ops.fragile_compact(values, radii, threshold)
    assert torch.equal(sparse.indices(), index) and torch.equal(sparse.values(), value)
    assert torch.equal(sparse.radii(), radius)  # recomputed (analytic) or stored (mc): the kernel's radii
    if threshold == 0.005:
        assert 0 < index.numel() < 291  # the data really has fragile and robust coordinates


def test_analytic_radii_recomputed_from_values_equal_the_stored_ones():
    values, radii = _step_outputs("analytic", sizes=(1 << 14 | 5, 17), seed=9)
    recomputed = FragileSet.record(values, radii, 1.0, beta=BETA, layout=DENSE)
    stored = FragileSet.record(values, radii, 1.0, beta=None, layout=DENSE)
    assert recomputed.radius is None and stored.radius is not None  # analytic stores values only
    assert torch.equal(recomputed.radii(), torch.cat([r.reshape(-1) for r in radii]))
    _same_reads(recomputed, stored)


@pytest.mark.parametrize("mode", ["analytic", "mc"])
def test_bytes_held_and_the_smaller_layout_is_chosen(mode):
    values, radii = _step_outputs(mode)
    beta = BETA if mode == "analytic" else None
    d = sum(v.numel() for v in values)
    per_value = 4 if mode == "analytic" else 8  # float32 value (+ float32 radius in mc)
    for threshold in (0.0, 0.004, 0.02, 10.0):
        fragile = int((torch.cat([r.reshape(-1) for r in radii]) < threshold).sum())
        sparse = FragileSet.record(values, radii, threshold, beta=beta, layout=SPARSE)
        dense = FragileSet.record(values, radii, threshold, beta=beta, layout=DENSE)
        auto = FragileSet.record(values, radii, threshold, beta=beta)
        assert sparse.nbytes == fragile * (4 + per_value)  # int32 index while d < 2^31
        assert dense.nbytes == d * per_value
        assert auto.nbytes == min(sparse.nbytes, dense.nbytes)
        assert sparse.index.dtype == torch.int32


def test_bad_layout_is_refused():
    values, radii = _step_outputs("analytic")
    with pytest.raises(ValueError, match="fragile layout must be one of"):
        FragileSet.record(values, radii, 0.01, beta=BETA, layout="packed")
    trainer = digits_trainer()
    trainer.fragile_layout = "packed"
    with pytest.raises(ValueError, match="fragile layout must be one of"):
        trainer.train(steps=1)


def _trained(layout, mode="analytic", epochs=2, **kw):
    trainer = digits_trainer(mode=mode, **kw)
    trainer.fragile_layout = layout
    return trainer.train(epochs=epochs)


@pytest.mark.parametrize("mode", ["analytic", "mc"])
def test_dense_and_sparse_records_give_the_same_checks(mode):
    sparse, dense = _trained(SPARSE, mode), _trained(DENSE, mode)
    assert {r.fragile.layout for r in sparse.records} == {SPARSE}
    assert {r.fragile.layout for r in dense.records} == {DENSE}
    assert first_difference(sparse, dense) is None  # the layout does not touch training
    assert sparse.certificate().to_dict() == dense.certificate().to_dict()
    gen = torch.Generator().manual_seed(31)
    exactly = 0
    for i in range(6):
        forget = torch.randperm(1400, generator=gen)[: 1 + i % 3]
        a, b = sparse.check_request(forget), dense.check_request(forget)
        a.seconds = b.seconds = 0.0
        assert a.to_dict() == b.to_dict()
        exactly += a.steps_checked_exactly
    assert exactly > 0  # the checks really read the fragile sets


def test_dense_records_predict_the_first_divergent_step():
    """The dense layout's check against a real retraining run (test_pcmu does the same for 'auto')."""
    dense = _trained(DENSE)
    gen = torch.Generator().manual_seed(77)
    for _ in range(3):
        forget = torch.randperm(1400, generator=gen)[:2]
        check = dense.check_request(forget)
        retrained = digits_trainer(exclude=forget).train(epochs=2)
        diff = first_difference(dense, retrained)
        if check.status == "exact":
            assert diff is None
        elif check.status == "diverges":
            assert diff == check.first_divergent_step
        else:
            assert diff is None or diff >= check.first_divergent_step


def test_record_bytes_are_the_bytes_held():
    trainer = _trained("auto", max_request=1)
    got = trainer.record_bytes()
    held = [sum(t.numel() * t.element_size() for t in (r.codes, r.fragile.value, r.fragile.index,
                                                        r.fragile.radius) if t is not None)
            for r in trainer.records]
    assert got["per_step"] == held and got["total"] == sum(held)
    d = trainer.coordinates
    assert got["codes"] == len(trainer.records) * -(-d // 4)
    assert "ids" not in got and "ids" not in trainer.records[0].to_state()  # the schedule gives them
    assert got["layouts"][SPARSE] + got["layouts"][DENSE] == len(trainer.records)


def test_estimate_before_training_is_the_worst_case_and_exact_when_dense():
    worst = digits_trainer(max_request=8)
    estimate = worst.estimate_record_bytes(epochs=2)
    assert estimate["fragile_fraction"] == 1.0 and estimate["layout"] == DENSE
    worst.train(epochs=2)  # digits: 1400 ids in 4 full batches of 350, nearly all fragile at M = 8
    got = worst.record_bytes()
    assert got["fragile_coordinates"] > 0.9 * got["steps"] * worst.coordinates
    assert got["layouts"][DENSE] == got["steps"]  # dense bytes do not depend on the count
    assert got["total"] == estimate["total"]
    # With few fragile coordinates the estimate follows the observed share and the sparse layout.
    few = _trained("auto", max_request=1, epochs=1)
    share = few.record_bytes()["fragile_coordinates"] / (few.steps_done * few.coordinates)
    assert 0 < share < 0.5
    later = few.estimate_record_bytes(epochs=1)
    assert later["layout"] == SPARSE and later["fragile_fraction"] == pytest.approx(share)
    with pytest.raises(ValueError, match="fragile_fraction"):
        estimate_record_bytes(10, 1, fragile_fraction=1.5)


def _saved_and_loaded(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_state_round_trip_keeps_layouts_and_answers():
    trainer = _trained("auto", max_request=1)
    forget = [5, 900]
    before = trainer.check_request(forget)
    other = digits_trainer(max_request=1)
    other.load_state_dict(_saved_and_loaded(trainer.state_dict()))
    assert [r.fragile.layout for r in other.records] == [r.fragile.layout for r in trainer.records]
    after = other.check_request(forget)
    before.seconds = after.seconds = 0.0
    assert before.to_dict() == after.to_dict()


def test_records_of_the_earlier_format_still_load():
    """Before the layouts: every record held int64 index + value + radius of its fragile set."""
    trainer = _trained(DENSE)
    state = trainer.state_dict()
    state["records"] = [{"step": r.step, "step_size": r.step_size, "offset": r.offset, "applied": r.applied,
                         "min_radius": r.min_radius, "codes": r.codes, "fragile_index": r.fragile_index,
                         "fragile_value": r.fragile_value, "fragile_radius": r.fragile_radius}
                        for r in trainer.records]
    other = digits_trainer()
    other.load_state_dict(_saved_and_loaded(state))
    assert all(r.fragile.layout == SPARSE and r.fragile.radius is not None for r in other.records)
    assert other.certificate().to_dict() == trainer.certificate().to_dict()
    for forget in ([3], [10, 700]):
        a, b = trainer.check_request(forget), other.check_request(forget)
        a.seconds = b.seconds = 0.0
        assert a.to_dict() == b.to_dict()
    assert isinstance(other.records[0], PCMUStep)
    assert other.record_bytes()["fragile"] == 16 * other.record_bytes()["fragile_coordinates"]


def test_records_with_a_fragile_dict_still_load():
    """Records saved before to_record (a "fragile" dict of the FragileSet's fields) load as they were."""
    trainer = _trained(DENSE)
    state = trainer.state_dict()
    fragile = ("layout", "coordinates", "threshold", "beta", "count", "value", "index", "radius")
    state["records"] = [{"step": r.step, "step_size": r.step_size, "offset": r.offset, "applied": r.applied,
                         "min_radius": r.min_radius, "codes": r.codes,
                         "fragile": {k: getattr(r.fragile, k) for k in fragile}}
                        for r in trainer.records]
    other = digits_trainer()
    other.load_state_dict(_saved_and_loaded(state))
    assert [r.to_state()["meta"] for r in other.records] == [r.to_state()["meta"] for r in trainer.records]
    assert other.certificate().to_dict() == trainer.certificate().to_dict()


def test_selected_equals_the_three_accessors():
    """selected() (one radius computation, what the check reads) gives what indices(), values()
    and radii() give, in both layouts and both modes."""
    gen = torch.Generator().manual_seed(11)
    values = [torch.randn(37, 5, generator=gen) * 0.01, torch.randn(13, generator=gen) * 0.01]
    beta = 0.004
    for mode_beta in (beta, None):
        radii = [(v.abs() - beta).abs() if mode_beta is not None else torch.rand(v.shape, generator=gen) * 0.01
                 for v in values]
        if mode_beta is not None:  # analytic: the kernel's own radii
            radii = list(_ops.quantize_analytic(values, beta, 0.0)[1])
        for layout in ("sparse", "dense"):
            fs = FragileSet.record(values, radii, 0.003, beta=mode_beta, layout=layout)
            index, value, radius = fs.selected()
            assert index.numel() == fs.count > 0
            assert torch.equal(index, fs.indices()) and torch.equal(value, fs.values())
            assert torch.equal(radius, fs.radii())
