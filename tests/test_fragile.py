"""fragile_compact: kernel vs reference (odd sizes, dtypes, layouts, empty), opcheck, bad input."""
import pytest
import torch
from torch.library import opcheck

from unlearn_ext import ops as _ops, reference

from conftest import DTYPES, LAYOUTS, devices, make_list, requires_compiled


def _radii_for(values):
    # Radii of the analytic quantizer at beta = 0.1: realistic, with many entries near the threshold.
    return [(v.float().abs() - 0.1).abs().contiguous() for v in values]


@requires_compiled
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", [[0], [1], [255], [1 << 16 | 3, 7, 0, 4099], []])
def test_fragile_compact_matches_reference(device, dtype, sizes):
    values = make_list(sizes, LAYOUTS, dtype, device, seed=3)
    radii = _radii_for(values)
    got = _ops.fragile_compact(values, radii, 0.05)
    want = reference.fragile_compact([v.cpu() for v in values], [r.cpu() for r in radii], 0.05)
    for g, w in zip(got, want):
        assert torch.equal(g.cpu(), w)
    # Cross-check the reference itself with a direct definition.
    flat_r = torch.cat([r.reshape(-1).cpu() for r in radii]) if radii else torch.empty(0)
    assert torch.equal(want[0], torch.nonzero(flat_r < 0.05).reshape(-1))
    if sizes and sum(sizes) > 1000:
        assert 0 < want[0].numel() < sum(sizes)  # the test data really exercises both branches


@requires_compiled
def test_fragile_compact_nan_radius_is_fragile():
    values = [torch.tensor([1.0, 2.0, 3.0])]
    radii = [torch.tensor([1.0, float("nan"), 0.01])]
    index, value, radius = _ops.fragile_compact(values, radii, 0.5)
    assert index.tolist() == [1, 2] and value.tolist() == [2.0, 3.0]


@requires_compiled
def test_fragile_compact_opcheck():
    values = make_list([33, 1025], ("contiguous", "strided"), torch.float32, "cpu", seed=1)
    opcheck(torch.ops.unlearn_ext.fragile_compact, (values, _radii_for(values), 0.05))


@pytest.mark.parametrize("impl", ["compiled", "reference"])
def test_fragile_compact_bad_input(impl):
    if impl == "compiled" and not _ops.compiled():
        pytest.skip("compiled extension not loaded")
    fn = _ops.fragile_compact if impl == "compiled" else reference.fragile_compact
    v = [torch.zeros(4)]
    with pytest.raises((RuntimeError, ValueError), match="radii"):
        fn(v, [torch.zeros(5)], 0.1)
    with pytest.raises((RuntimeError, ValueError, TypeError), match="float32"):
        fn(v, [torch.zeros(4, dtype=torch.float64)], 0.1)
    with pytest.raises((RuntimeError, ValueError), match="tensors"):
        fn(v, [], 0.1)
