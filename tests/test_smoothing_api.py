"""The public smoothing API (unlearn_ext.smoothing): the fused step against quantize-then-update,
non-finite policies, statistics, and SmoothedQuantizer's RNG bookkeeping (docs/design.md §3, §4)."""
import math

import pytest
import torch

import unlearn_ext as ue
from unlearn_ext import reference
from unlearn_ext.pcmu.smoothing import analytic_threshold, blocks_per_element, radius_table
from conftest import DTYPES, LAYOUTS, assert_lists_equal, devices, make_list, make_params, to_cpu

KW = dict(tau=0.2, sigma=0.3, n0=8, n=64, count_below=0.1)


def expected_update(w, code, step_size):
    """w - step_size * code in float32 math, rounded once to w's dtype (docs/design.md §4)."""
    return (w.float() - torch.tensor(step_size, dtype=torch.float32) * code.float()).to(w.dtype)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("mode", ["analytic", "mc"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_step_equals_quantize_then_update(device, mode, dtype):
    sizes = [300, 0, 17, 1, 4099]
    grads = make_list(sizes, LAYOUTS, dtype, device, seed=5)
    params, holders, covered = make_params(grads, seed=6)  # incl. transposed and strided views
    before = [p.clone() for p in params]
    holders_before = [h.clone() for h in holders]
    kw = dict(KW, mode=mode, seed=2**63 + 11, offset=2**32 - 1)
    q = ue.smooth_quantize(grads, **kw)
    stats = ue.smooth_quantize_step_(params, grads, step_size=0.01, **kw)
    for p, b, c in zip(params, before, q.codes):
        assert torch.equal(p, expected_update(b, c, 0.01))
    for h, hb, mask in zip(holders, holders_before, covered):  # views changed only where they look
        assert torch.equal(h[~mask], hb[~mask])
    assert torch.equal(stats.counts, q.counts)
    assert stats.min_radius == q.min_radius
    assert stats.applied and stats.nonfinite == 0
    assert any(bool(c.any()) for c in q.codes)  # the step really moved something


@pytest.mark.parametrize("mode", ["analytic", "mc"])
def test_step_on_module_parameters(mode):
    """The realistic call: leaf parameters that require grad, updated in place under the hood."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    x, y = torch.randn(32, 6), torch.randint(0, 2, (32,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    params = list(model.parameters())
    grads = [p.grad for p in params]
    before = [p.detach().clone() for p in params]
    q = ue.SmoothedQuantizer(tau=0.01, sigma=0.05, mode=mode, n0=8, n=256, seed=1)
    codes = ue.smooth_quantize(grads, tau=0.01, sigma=0.05, mode=mode, n0=8, n=256, seed=1).codes
    q.step_(model.parameters(), grads, step_size=0.05)
    for p, b, c in zip(params, before, codes):
        assert p.requires_grad and p.is_leaf
        assert torch.equal(p.detach(), expected_update(b, c, 0.05))


@pytest.mark.parametrize("mode", ["analytic", "mc"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_gradient_policies(mode, bad):
    grads = [torch.randn(50), torch.randn(3, 4)]
    grads[1][2, 1] = bad
    params = [torch.randn(50), torch.randn(3, 4)]
    before = [p.clone() for p in params]
    kw = dict(tau=0.1, sigma=0.2, mode=mode, n0=4, n=64)
    with pytest.raises(FloatingPointError, match=r"1 gradient entries are NaN or Inf.*no parameter was changed"):
        ue.smooth_quantize_step_(params, grads, step_size=0.1, **kw)
    assert_lists_equal(params, before, "params")
    stats = ue.smooth_quantize_step_(params, grads, step_size=0.1, nonfinite="skip", **kw)
    assert not stats.applied and stats.nonfinite == 1 and math.isinf(stats.min_radius)
    assert_lists_equal(params, before, "params")

    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        ue.smooth_quantize(grads, **kw)
    res = ue.smooth_quantize(grads, nonfinite="skip", **kw)
    assert res.nonfinite == 1 and int(res.codes[1][2, 1]) == 0 and float(res.radii[1][2, 1]) == 0.0
    assert res.min_radius == 0.0
    # the finite coordinates are quantized as if the bad one were absent
    clean = [grads[0], grads[1].clone()]
    clean[1][2, 1] = 0.0
    ok = ue.smooth_quantize(clean, **kw)
    assert torch.equal(res.codes[0], ok.codes[0])
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[2, 1] = False
    assert torch.equal(res.codes[1][mask], ok.codes[1][mask])


@pytest.mark.parametrize("mode", ["analytic", "mc"])
def test_statistics_describe_the_radii(mode):
    grads = make_list([1000, 37, 0], LAYOUTS, seed=9, scale=0.25)
    for count_below in (0.0, 0.05, 0.3, float("inf")):
        res = ue.smooth_quantize(grads, tau=0.2, sigma=0.3, mode=mode, n0=8, n=100, count_below=count_below)
        flat = torch.cat([r.reshape(-1) for r in res.radii])
        assert res.min_radius == float(flat.min())
        assert res.below == int((flat < count_below).sum())
        assert res.nonfinite == 0
        if mode == "analytic":
            assert res.abstained == 0
        else:  # abstention = code 0 with radius 0; a certificate always has a positive radius
            assert res.abstained == int((flat == 0).sum()) > 0
            codes = torch.cat([c.reshape(-1) for c in res.codes])
            assert not codes[flat == 0].any()


def test_analytic_ignores_seed_and_offset():
    grads = make_list([500, 3], LAYOUTS, seed=2)
    a = ue.smooth_quantize(grads, tau=0.2, sigma=0.3, seed=1, offset=0)
    b = ue.smooth_quantize(grads, tau=0.2, sigma=0.3, seed=2**64 - 1, offset=12345)
    assert_lists_equal(a.codes, b.codes) and assert_lists_equal(a.radii, b.radii)
    assert blocks_per_element("analytic", 16, 64) == 0


def test_public_mc_equals_reference_with_unsigned_seed():
    """Seeds and offsets >= 2^63 go through the public API (mapped to the schema's int64) and give
    the reference's results for the same unsigned values."""
    grads = make_list([700, 45], LAYOUTS, seed=12)
    seed, offset = 2**64 - 3, 2**63 + 2**32 - 1
    res = ue.smooth_quantize(grads, tau=0.2, sigma=0.3, mode="mc", n0=8, n=64, seed=seed, offset=offset)
    ref = reference.quantize_mc(to_cpu(grads), 0.2, 0.3, 8, 64, radius_table(64), seed, offset, 0.0)
    assert_lists_equal(res.codes, ref[0])
    assert torch.equal(res.counts, ref[3])


def test_empty_inputs():
    res = ue.smooth_quantize([], tau=0.1, sigma=0.2)
    assert res.codes == [] and res.radii == [] and math.isinf(res.min_radius) and res.counts.tolist() == [0, 0, 0]
    res = ue.smooth_quantize([], tau=0.1, sigma=0.2, mode="mc", n0=2, n=3)
    assert res.codes == [] and math.isinf(res.min_radius)
    for mode in ("analytic", "mc"):
        stats = ue.smooth_quantize_step_([], [], step_size=0.1, tau=0.1, sigma=0.2, mode=mode)
        assert stats.applied and math.isinf(stats.min_radius)
        res = ue.smooth_quantize([torch.zeros(0), torch.zeros(0, 3)], tau=0.1, sigma=0.2, mode=mode)
        assert [tuple(c.shape) for c in res.codes] == [(0,), (0, 3)] and math.isinf(res.min_radius)
    res = ue.smooth_quantize(torch.randn(4, 5), tau=0.1, sigma=0.2)  # a single tensor is a list of one
    assert len(res.codes) == 1 and res.codes[0].shape == (4, 5)


# ---- SmoothedQuantizer ----------------------------------------------------------------------------

@pytest.mark.parametrize("n0,n", [(5, 10), (16, 64), (1, 1), (3, 6), (4, 4)])
def test_quantizer_advances_offset_by_blocks(n0, n):
    blocks = (n0 + n + 3) // 4  # ceil((n0 + n) / 4)
    assert blocks == math.ceil((n0 + n) / 4)
    grads = [torch.randn(200) * 0.2]
    q = ue.SmoothedQuantizer(tau=0.1, sigma=0.2, mode="mc", n0=n0, n=n, seed=3)
    assert q.offset == 0 and q.blocks_per_call == blocks
    for step in range(1, 4):
        res = q.quantize(grads)
        direct = ue.smooth_quantize(grads, tau=0.1, sigma=0.2, mode="mc", n0=n0, n=n, seed=3,
                                    offset=(step - 1) * blocks)
        assert_lists_equal(res.codes, direct.codes) and assert_lists_equal(res.radii, direct.radii)
        assert q.offset == step * blocks and q.steps == step
    params = [torch.zeros(200)]
    q.step_(params, grads, step_size=0.1)
    assert q.offset == 4 * blocks and q.steps == 4


def test_quantizer_analytic_does_not_advance():
    q = ue.SmoothedQuantizer(tau=0.1, sigma=0.2)
    q.quantize([torch.randn(10)])
    assert q.offset == 0 and q.steps == 1
    assert q.beta == analytic_threshold(0.1, 0.2)


def test_quantizer_offset_wraps_modulo_2_64():
    q = ue.SmoothedQuantizer(tau=0.1, sigma=0.2, mode="mc", n0=3, n=6, seed=2**64 - 1)
    q.offset = 2**64 - 1
    g = [torch.randn(64) * 0.2]
    res = q.quantize(g)
    assert q.offset == 2  # (2^64 - 1 + 3) mod 2^64
    ref = reference.quantize_mc(g, 0.1, 0.2, 3, 6, radius_table(6), 2**64 - 1, 2**64 - 1, 0.0)
    assert_lists_equal(res.codes, ref[0])


def test_quantizer_draws_fresh_numbers_each_step():
    g = [torch.full((4000,), 0.2)]  # v = tau: p+ = 1/2, the draws decide every code
    q = ue.SmoothedQuantizer(tau=0.2, sigma=0.2, mode="mc", n0=1, n=64, alpha=0.5, seed=8)
    first, second = q.quantize(g), q.quantize(g)
    assert not torch.equal(first.codes[0], second.codes[0])


@pytest.mark.parametrize("mode", ["analytic", "mc"])
def test_quantizer_replays_from_state_dict(mode):
    """A training run replays exactly from (seed, step): restoring a state dict into a quantizer
    with a different configuration reproduces the original run's remaining steps bit for bit."""
    torch.manual_seed(0)
    grads_per_step = [[torch.randn(300) * 0.2, torch.randn(7, 3) * 0.2] for _ in range(6)]
    q = ue.SmoothedQuantizer(tau=0.1, sigma=0.15, mode=mode, n0=6, n=64, seed=2**63 + 5, nonfinite="skip")
    params = [torch.zeros(300), torch.zeros(7, 3)]
    saved = None
    history = []
    for step, grads in enumerate(grads_per_step):
        if step == 3:
            saved = (q.state_dict(), [p.clone() for p in params])
        stats = q.step_(params, grads, step_size=0.05)
        history.append((stats.counts.clone(), [p.clone() for p in params]))
    assert saved[0]["steps"] == 3 and saved[0]["offset"] == 3 * q.blocks_per_call
    replay = ue.SmoothedQuantizer(tau=1.0, sigma=1.0, nonfinite="skip")
    replay.load_state_dict(saved[0])
    assert replay.state_dict() == saved[0]
    params2 = saved[1]
    for step in range(3, 6):
        stats = replay.step_(params2, grads_per_step[step], step_size=0.05)
        assert torch.equal(stats.counts, history[step][0])
        assert_lists_equal(params2, history[step][1], f"params at step {step}")
    assert replay.state_dict() == q.state_dict()


def test_skipped_step_still_advances():
    q = ue.SmoothedQuantizer(tau=0.1, sigma=0.2, mode="mc", n0=4, n=8, nonfinite="skip")
    grads = [torch.tensor([float("nan"), 0.1])]
    params = [torch.zeros(2)]
    stats = q.step_(params, grads, step_size=1.0)
    assert not stats.applied and torch.equal(params[0], torch.zeros(2))
    assert q.offset == 3 and q.steps == 1


@pytest.mark.parametrize("bad", [dict(sigma=0.0), dict(tau=-1.0), dict(mode="median"), dict(mode="mc", n0=0),
                                 dict(mode="mc", n=0), dict(alpha=1.0), dict(alpha=0.0),
                                 dict(mode="mc", n0=2**30, n=1)])
def test_check_smoothing_config(bad):
    """The configuration check the trainer and SmoothedQuantizer run when built (no kernel call)."""
    from unlearn_ext.pcmu.smoothing import check_smoothing_config
    good = dict(tau=0.1, sigma=0.2, mode="analytic", n0=4, n=8, alpha=1e-3)
    check_smoothing_config(**good)
    check_smoothing_config(**{**good, "mode": "mc"})
    with pytest.raises(ValueError):
        check_smoothing_config(**{**good, **bad})
