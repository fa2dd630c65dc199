"""Framework D's vote counters (docs/design.md §4): vote_accumulate_ and vote_finalize against the
reference, their consistency with quantize_mc's certification, and the VoteCounter helper."""
import math

import pytest
import torch

import unlearn_ext as ue
from unlearn_ext import ops as _ops, reference
from unlearn_ext.reference import smoothing as ref_smoothing
from unlearn_ext.pcmu.smoothing import radius_table
from conftest import (DTYPES, LAYOUTS, assert_lists_equal, assert_quantize_equal, devices, make_list,
                      signed64, to_cpu)

VOTE_DTYPES = [torch.int16, torch.int32]


def zero_votes(grads, dtype):
    return [torch.zeros((2, *g.shape), dtype=dtype, device=g.device) for g in grads]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vote_dtype", VOTE_DTYPES)
def test_vote_accumulate_matches_reference(device, dtype, vote_dtype):
    tau = 0.1
    tau_f = float(torch.tensor(tau, dtype=torch.float32))
    sizes = [0, 7, 255, 1, 4099]
    votes = None
    ref_votes = None
    for sample in range(5):
        grads = make_list(sizes, LAYOUTS, dtype, device, seed=100 + sample, scale=0.15, shift=0.03)
        if sample == 2:  # exact thresholds (strict inequalities) and non-finite values
            special = torch.tensor([tau_f, -tau_f, math.nextafter(tau_f, 1), -math.nextafter(tau_f, 1),
                                    float("nan"), float("inf"), -float("inf")])
            grads[1] = special.reshape(grads[1].shape).to(dtype).to(device)
        if votes is None:
            votes = zero_votes(grads, vote_dtype)
            ref_votes = [v.cpu().clone() for v in votes]
        bad = _ops.vote_accumulate_(votes, grads, tau)
        ref_bad = reference.vote_accumulate_(ref_votes, to_cpu(grads), tau)
        assert bad.dtype == torch.int64 and bad.shape == ()
        assert int(bad) == int(ref_bad) == sum(int((~torch.isfinite(g.float())).sum()) for g in grads)
        assert_lists_equal(votes, ref_votes, "votes")
    # the accumulated counters hold counts of v < -tau and v > tau
    assert int(votes[4].sum()) > 0
    assert all(int(v.min()) >= 0 and int(v.sum(0).max()) <= 5 for v in votes if v.numel())


@pytest.mark.parametrize("device", devices())
def test_vote_accumulate_device_equals_cpu_kernel(device):
    grads = make_list([0, 33, 4099], LAYOUTS, torch.float32, device, seed=1, scale=0.2)
    votes = zero_votes(grads, torch.int32)
    cpu_votes = zero_votes(to_cpu(grads), torch.int32)
    for _ in range(3):
        _ops.vote_accumulate_(votes, grads, 0.1)
        _ops.vote_accumulate_(cpu_votes, to_cpu(grads), 0.1)
    assert_lists_equal(votes, cpu_votes, "votes")


def random_counts(shape, n_total, dtype, gen, device):
    """Consistent counters (neg + pos <= n_total), with many ties among the three classes."""
    neg = torch.randint(0, n_total + 1, shape, generator=gen)
    pos = (torch.rand(shape, generator=gen) * (n_total - neg + 1)).floor().long()
    # force ties on some entries: zero == pos, zero == neg, pos == neg > zero
    flat_neg, flat_pos = neg.reshape(-1), pos.reshape(-1)
    if n_total % 3 == 0 and flat_neg.numel() >= 3:
        flat_neg[0], flat_pos[0] = n_total // 3, n_total // 3
    if n_total % 2 == 0 and flat_neg.numel() >= 3:
        flat_neg[1], flat_pos[1] = n_total // 2, n_total // 2
        flat_neg[2], flat_pos[2] = 0, n_total // 2
    return torch.stack([neg, pos]).to(dtype).to(device)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("sel_dtype,est_dtype", [(torch.int16, torch.int16), (torch.int32, torch.int32),
                                                 (torch.int16, torch.int32), (torch.int32, torch.int16)])
@pytest.mark.parametrize("n0,n,table_kind", [(6, 64, "clopper-pearson"), (12, 30, "synthetic"),
                                              (1, 1, "synthetic"), (4, 1000, "clopper-pearson")])
def test_vote_finalize_matches_reference(device, sel_dtype, est_dtype, n0, n, table_kind):
    gen = torch.Generator().manual_seed(n0 * 1000 + n)
    shapes = [(0,), (257,), (3, 0), (1,), (6, 7, 5), (4096,)]
    sel = [random_counts(s, n0, sel_dtype, gen, device) for s in shapes]
    est = [random_counts(s, n, est_dtype, gen, device) for s in shapes]
    if table_kind == "clopper-pearson":
        table = radius_table(n)
    else:
        table = torch.linspace(-1.0, 2.0, n + 1) + 1e-3
    for sigma, count_below in ((0.5, 0.2), (1e-3, 0.0), (7.0, float("inf"))):
        out = _ops.vote_finalize(sel, est, n0, n, table.to(device), sigma, count_below)
        ref = reference.vote_finalize(to_cpu(sel), to_cpu(est), n0, n, table, sigma, count_below)
        assert_quantize_equal(out, ref, shapes=shapes)
        if device != "cpu":
            assert_quantize_equal(out, _ops.vote_finalize(to_cpu(sel), to_cpu(est), n0, n, table, sigma,
                                                          count_below))
    codes = torch.cat([c.reshape(-1) for c in out[0]]).cpu()
    assert set(codes.unique().tolist()) <= {-1, 0, 1}


def test_vote_finalize_tie_rules():
    """Selection ties prefer 0, then +1, then -1; k_A is the estimation count of the chosen class."""
    n0, n = 6, 10
    table = torch.arange(n + 1, dtype=torch.float32) + 1.0  # every count certifies, radius = k_A + 1
    sel_neg = torch.tensor([2, 3, 0, 3, 1, 0, 6])
    sel_pos = torch.tensor([2, 0, 3, 3, 2, 6, 0])
    # zero counts:           2, 3, 3, 0, 3, 0, 0
    expected_class = torch.tensor([0, 0, 0, 1, 0, 1, -1], dtype=torch.int8)
    est_neg = torch.tensor([1, 2, 3, 4, 5, 6, 7])
    est_pos = torch.tensor([0, 1, 2, 3, 4, 3, 2])
    est_zero = n - est_neg - est_pos
    k_a = torch.where(expected_class == 0, est_zero, torch.where(expected_class > 0, est_pos, est_neg))
    sel = [torch.stack([sel_neg, sel_pos]).to(torch.int16)]
    est = [torch.stack([est_neg, est_pos]).to(torch.int16)]
    codes, radii, _, counts = _ops.vote_finalize(sel, est, n0, n, table, 1.0, 0.0)
    assert torch.equal(codes[0], expected_class)
    exact = (k_a + 1).double()
    assert bool((radii[0].double() <= exact).all()) and bool((radii[0].double() >= exact * (1 - 2**-21)).all())
    assert int(counts[0]) == 0


@pytest.mark.parametrize("device", devices())
def test_vote_finalize_agrees_with_quantize_mc(device):
    """Framework D's finalize and framework G's mc kernel share the certification: feeding the
    reference's Monte-Carlo counts into vote_finalize gives quantize_mc's codes and radii."""
    n0, n, tau, sigma, seed, offset = 8, 64, 0.1, 0.2, 77, 2**32 - 5
    g = (torch.randn(3000, generator=torch.Generator().manual_seed(0)) * 0.25).to(device)
    sn, sp, en, ep = ref_smoothing.mc_counts(g.cpu(), 0, tau, sigma, n0, n, seed, offset)
    sel = [torch.stack([sn, sp]).to(torch.int16).to(device)]
    est = [torch.stack([en, ep]).to(torch.int16).to(device)]
    table = radius_table(n).to(device)
    fin = _ops.vote_finalize(sel, est, n0, n, table, sigma, 0.0)
    mc = _ops.quantize_mc([g], tau, sigma, n0, n, table, signed64(seed), signed64(offset), 0.0)
    assert_quantize_equal(fin, mc)


# ---- VoteCounter ----------------------------------------------------------------------------------

@pytest.mark.parametrize("device", devices())
def test_vote_counter_end_to_end(device):
    n0, n, tau, sigma_data = 5, 40, 0.1, 0.5
    like = [torch.zeros(37, 3, device=device), torch.zeros(5, device=device), torch.zeros(0, device=device)]
    counter = ue.VoteCounter(like, tau=tau, sigma_data=sigma_data, n0=n0, n=n)
    assert all(v.dtype == torch.int16 for v in counter.selection + counter.estimation)
    ref_sel = [torch.zeros(2, *t.shape, dtype=torch.int64) for t in like]
    ref_est = [torch.zeros(2, *t.shape, dtype=torch.int64) for t in like]
    gen = torch.Generator().manual_seed(0)
    # per-coordinate means from -0.4 to 0.4: every class wins clearly somewhere, some coordinates tie
    means = [torch.linspace(-0.4, 0.4, t.numel()).reshape(t.shape) for t in like]
    with pytest.raises(RuntimeError, match="finalize needs n0 \\+ n"):
        counter.finalize()
    for s in range(n0 + n):
        gs = [torch.randn(t.shape, generator=gen) * 0.1 + m for t, m in zip(like, means)]
        counter.add([g.to(device) for g in gs])
        reference.vote_accumulate_(ref_sel if s < n0 else ref_est, gs, tau)
    for a, b in zip(counter.selection + counter.estimation, ref_sel + ref_est):
        assert torch.equal(a.cpu().long(), b)
    with pytest.raises(RuntimeError, match="already holds n0 \\+ n"):
        counter.add(like)
    res = counter.finalize(count_below=0.2)
    ref = reference.vote_finalize(ref_sel, ref_est, n0, n, radius_table(n), sigma_data, 0.2)
    assert_quantize_equal((res.codes, res.radii, res.min_radius_t, res.counts), ref)
    codes = torch.cat([c.reshape(-1) for c in res.codes]).cpu()
    radii = torch.cat([r.reshape(-1) for r in res.radii]).cpu()
    assert 0 < res.abstained < codes.numel()
    for cls in (-1, 0, 1):  # each class is certified somewhere
        assert bool(((codes == cls) & (radii > 0)).any()), cls


def test_vote_counter_picks_int32_for_large_counts():
    c = ue.VoteCounter([torch.zeros(3)], tau=0.1, sigma_data=1.0, n0=2**15, n=4)
    assert c.selection[0].dtype == torch.int32 and c.selection[0].shape == (2, 3)
    c = ue.VoteCounter([torch.zeros(3)], tau=0.1, sigma_data=1.0, n0=2**15 - 1, n=4)
    assert c.selection[0].dtype == torch.int16


def test_public_vote_functions_on_empty_lists():
    assert ue.vote_accumulate_([], [], tau=0.1) == 0
    res = ue.vote_finalize([], [], n0=2, n=3, sigma=1.0)
    assert res.codes == [] and math.isinf(res.min_radius)


def test_public_vote_accumulate_counts_nonfinite():
    votes = [torch.zeros(2, 4, dtype=torch.int32)]
    assert ue.vote_accumulate_(votes, [torch.tensor([float("nan"), 1.0, -1.0, float("inf")])], tau=0.5) == 2
    assert votes[0].tolist() == [[0, 0, 1, 0], [0, 1, 0, 1]]
