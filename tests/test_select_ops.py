"""Selection kernels (docs/design.md §7): exact top-K, Random-k and Bernoulli selections, the fused
apply and the masked gradient, against the reference (unlearn_ext/reference/select.py)."""
from __future__ import annotations


import pytest
import torch

from unlearn_ext import ops, reference, selection as S
from unlearn_ext.reference import select as RS

from conftest import DTYPES, LAYOUTS, devices, make_list, requires_compiled

pytestmark = requires_compiled


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts]) if ts else torch.zeros(0, dtype=torch.bool)


def reference_topk_mask(scores, k, mode=1, seed=0, offset=0):
    """The truth: keys of the reference, a stable descending sort (lower index first among ties)."""
    keys, nan = RS.keys_of(scores, mode, seed, offset, 0)
    assert not nan.any()
    order = torch.sort(keys, descending=True, stable=True).indices
    mask = torch.zeros(keys.numel(), dtype=torch.bool)
    mask[order[:k].cpu()] = True
    return mask


def selected_mask(sel, like):
    return flat(sel.masks(like)).cpu()


def tied_list(dtype, device, levels=3, sizes=(37, 1, 255, 6, 0, 64)):
    """Heavy ties: every value one of a few levels (and their negatives)."""
    out = []
    for i, t in enumerate(make_list(list(sizes), LAYOUTS, torch.float32, device, seed=5)):
        out.append(((t * 4).round().clamp(-levels, levels) / 4).to(dtype))
    return out


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["normal", "ties", "all_equal"])
@pytest.mark.parametrize("by", ["abs", "value"])
def test_topk_equals_reference(device, dtype, kind, by):
    if kind == "normal":
        scores = make_list([37, 1, 255, 6, 0, 1000], LAYOUTS, dtype, device, seed=2)
    elif kind == "ties":
        scores = tied_list(dtype, device)
    else:
        scores = [torch.full((50,), 0.5, dtype=dtype, device=device), torch.full((3, 7), 0.5, dtype=dtype,
                                                                                 device=device).t()]
    n = sum(s.numel() for s in scores)
    mode = S.KEY_MODES[by]
    for k in sorted({0, 1, 2, 7, n // 10, n // 2, n - 1, n}):
        sel = S.topk(scores, k, by=by)
        got = selected_mask(sel, scores)
        assert int(got.sum()) == k == sel.count
        assert torch.equal(got, reference_topk_mask(scores, k, mode)), (kind, k)


def test_topk_fraction_and_zero_signs():
    s = [torch.tensor([-0.0, 0.0, 1.0, -1.0, 0.0])]
    sel = S.topk(s, 0.4, by="value")  # floor(0.4 * 5 + 0.5) = 2: 1.0, then the first zero (-0.0 == +0.0)
    assert sel.count == 2
    assert selected_mask(sel, s).tolist() == [True, False, True, False, False]
    assert S.resolve_k(0.5, 3) == 2 and S.resolve_k(1.0, 3) == 3 and S.resolve_k(0.0, 3) == 0
    with pytest.raises(ValueError):
        S.resolve_k(4, 3)
    with pytest.raises(TypeError):
        S.resolve_k(True, 3)


@pytest.mark.parametrize("device", devices())
def test_nan_scores_refused(device):
    s = [torch.tensor([1.0, float("nan"), 2.0], device=device)]
    with pytest.raises(ValueError, match="NaN"):
        S.topk(s, 1)
    # The histogram counts them apart, like the reference; apply never selects them.
    h = ops.select_histogram(s, 1, 0, 0, 0, 0, 0, 8)
    assert int(h[-1]) == 1 and torch.equal(h.cpu(), RS.select_histogram([t.cpu() for t in s], 1, 0, 0, 0, 0, 0, 8))


def test_empty_list_and_empty_tensors():
    assert S.topk([], 0).count == 0
    sel = S.topk([torch.zeros(0), torch.zeros(3, 0)], 0)
    assert sel.count == 0 and sel.threshold == S.NOTHING
    assert ops.select_apply_([], [], [], [], 1, 0, 0, 0, 0, 0, 0, 0.0, 0, 0).item() == 0
    assert int(ops.select_histogram([], 1, 0, 0, 0, 0, 0, 4).sum()) == 0


# ---- the ops against the reference ------------------------------------------------------------------

def _histogram_cases():
    return [(1, 0, 0, 16), (0, 0, 0, 11), (2, 0, 0, 12), (1, 0x8, 4, 12), (1, 0x3f0, 10, 16), (1, 5, 3, 1)]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode,prefix,prefix_bits,digit_bits", _histogram_cases())
def test_histogram_equals_reference(device, dtype, mode, prefix, prefix_bits, digit_bits):
    scores = make_list([37, 1, 255, 6, 4097], LAYOUTS, dtype, device, seed=3)
    got = ops.select_histogram(scores, mode, 7, 2, 11, prefix, prefix_bits, digit_bits)
    want = RS.select_histogram([s.cpu() for s in scores], mode, 7, 2, 11, prefix, prefix_bits, digit_bits)
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("needed", [0, 1, 5, 40, 10**6])
def test_tie_boundary_equals_reference(device, needed):
    scores = tied_list(torch.float32, device, levels=1, sizes=(37, 1, 70000, 6))
    key = int(RS.order_key(torch.tensor([0.25]))[0])
    got = ops.select_tie_boundary(scores, 1, 0, 0, 3, key, needed)
    want = RS.select_tie_boundary([s.cpu() for s in scores], 1, 0, 0, 3, key, needed)
    assert int(got) == int(want)


ACTION_CASES = [("reset", 0.0, False), ("reset", 0.0, True), ("dampen", 0.1, False), ("noise", 0.05, False),
                ("axpy", -0.3, True)]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("action,alpha,with_source", ACTION_CASES)
@pytest.mark.parametrize("mode", [1, 2])
def test_apply_touches_only_selected(device, dtype, action, alpha, with_source, mode):
    params = make_list([37, 1, 255, 6], LAYOUTS, dtype, device, seed=9)
    scores = make_list([37, 1, 255, 6], LAYOUTS, torch.float16, device, seed=10)
    source = make_list([37, 1, 255, 6], LAYOUTS, dtype, device, seed=12) if with_source else None
    sel = S.topk(scores, 0.2) if mode == 1 else S.random_k(params, 0.2, seed=4, offset=1)
    before = [p.clone() for p in params]
    ref_params = [p.cpu().clone() for p in params]
    count, masks = sel.apply_(params, action, alpha, source, masks=True, noise_seed=21, noise_offset=3)
    m = flat(masks).cpu()
    assert count == sel.count == int(m.sum())
    changed = flat([(a != b) for a, b in zip(params, before)]).cpu()
    assert not (changed & ~m).any(), "an unselected coordinate changed"
    # The same apply in the reference.
    ref_scores = [s.cpu() for s in sel.scores]
    ref_masks = [torch.empty(p.shape, dtype=torch.bool) for p in ref_params]
    RS.select_apply_(ref_params, ref_scores, [s.cpu() for s in source] if source else [], ref_masks, sel.mode,
                     sel.seed, sel.offset, 0, sel.threshold, sel.boundary, S.ACTIONS[action], alpha, 21, 3)
    assert torch.equal(flat(ref_masks), m)
    got, want = flat(params).cpu().float(), flat(ref_params).float()
    if action in ("reset", "dampen"):
        assert torch.equal(got, want)
    else:  # fp32 math may contract into an FMA; normals may differ by an ulp (docs/design.md §3)
        torch.testing.assert_close(got, want, rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-6)
    if action == "reset" and not with_source:
        assert (got[m] == 0).all()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mask_grad_equals_reference(device, dtype):
    grads = make_list([37, 1, 255, 6], LAYOUTS, dtype, device, seed=13)
    scores = make_list([37, 1, 255, 6], LAYOUTS, dtype, device, seed=14)
    sel = S.topk(scores, 30)
    ref = [g.cpu().clone() for g in grads]
    sq = sel.mask_grad_(grads)
    want = RS.select_mask_grad_(ref, [s.cpu() for s in scores], 1, 0, 0, 0, sel.threshold, sel.boundary)
    assert torch.equal(flat(grads).cpu(), flat(ref))
    assert sq == pytest.approx(float(want), rel=1e-12)
    assert int((flat(grads) != 0).sum()) <= 30


# ---- the fused two-pass top-K (select_histogram_near + select_apply_bin_) -----------------------------

BIG = (70000, 3, 65536, 1000)  # above the kernel's sampling size: the CPU samples a bracket


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("k", [0, 1, 1366, 68270, 136539])
def test_histogram_near_is_exact_inside_its_bracket(device, dtype, mode, k):
    scores = make_list(BIG, LAYOUTS, dtype, device, seed=21)
    got = ops.select_histogram_near(scores, mode, 7, 2, 11, k).cpu()
    want = RS.select_histogram([s.cpu() for s in scores], mode, 7, 2, 11, 0, 0, 16)
    bins = 1 << 16
    lo, hi = int(got[bins + 1]), int(got[bins + 2])
    assert 0 <= lo <= hi < bins
    assert torch.equal(got[lo:hi + 1], want[lo:hi + 1])
    if hi + 1 < bins:
        assert int(got[hi + 1]) == int(want[hi + 1:bins].sum())
    if lo > 0:
        assert int(got[lo - 1]) == int(want[:lo].sum())
    outside = torch.ones(bins, dtype=torch.bool)
    outside[max(lo - 1, 0):hi + 2] = False
    assert not got[:bins][outside].any()
    assert int(got[bins]) == int(want[bins])  # NaN count
    # On these continuous scores the bracket holds the k-th largest key (what makes the path fast).
    if 0 < k < sum(BIG):
        b, _, _ = S.narrow(want[:bins], k, 16)
        assert lo <= b <= hi


def test_histogram_near_counts_nan_apart():
    s = [torch.randn(200000), torch.tensor([float("nan")] * 3)]
    s[0][5] = float("nan")
    got = ops.select_histogram_near(s, 1, 0, 0, 0, 2000)
    assert int(got[1 << 16]) == 4
    with pytest.raises(ValueError, match="NaN"):
        S.topk(s, 2000)


def _bin_cases():
    key_half = int(RS.order_key(torch.tensor([0.5]))[0])
    return [(key_half >> 16, 16, n) for n in (0, 1, 7, 10**6)] + [(key_half >> 20, 12, 3), (key_half, 32, 2),
                                                                   (key_half >> 31, 1, 40)]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prefix,prefix_bits,needed", _bin_cases())
@pytest.mark.parametrize("action,alpha,with_source", [("reset", 0.0, False), ("dampen", 0.1, False),
                                                      ("axpy", -0.3, True)])
def test_apply_bin_equals_reference(device, dtype, prefix, prefix_bits, needed, action, alpha, with_source):
    scores = tied_list(dtype, device, levels=4, sizes=(37, 1, 255, 6, 0, 640))
    params = make_list([37, 1, 255, 6, 0, 640], LAYOUTS, dtype, device, seed=9)
    source = make_list([37, 1, 255, 6, 0, 640], LAYOUTS, dtype, device, seed=12) if with_source else []
    ref_params = [p.cpu().clone() for p in params]
    masks = [torch.zeros(p.shape, dtype=torch.bool, device=device) for p in params]
    ref_masks = [torch.zeros(p.shape, dtype=torch.bool) for p in params]
    args = (1, 0, 0, 5, prefix, prefix_bits, needed, S.ACTIONS[action], alpha, 0, 0)
    got = ops.select_apply_bin_(params, scores, source, masks, *args)
    want = RS.select_apply_bin_(ref_params, [s.cpu() for s in scores], [s.cpu() for s in source], ref_masks, *args)
    assert got.tolist() == want.tolist()
    assert torch.equal(flat(masks).cpu(), flat(ref_masks))
    got_p, want_p = flat(params).cpu().float(), flat(ref_params).float()
    if action == "axpy":  # fp32 math may contract into an FMA
        torch.testing.assert_close(got_p, want_p, rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-6)
    else:
        assert torch.equal(got_p, want_p)
    # (count, threshold, boundary) describe the same selection to select_apply_.
    again = [torch.zeros(p.shape, dtype=torch.bool) for p in params]
    probe = [torch.zeros(p.shape) for p in params]
    n = RS.select_apply_(probe, [s.cpu() for s in scores], [], again, 1, 0, 0, 5, int(got[1]), int(got[2]), 1, 1.0,
                         0, 0)
    assert int(n) == int(got[0]) and torch.equal(flat(again), flat(ref_masks))


@pytest.mark.parametrize("mode", [1, 2])
@pytest.mark.parametrize("prefix_shift,prefix_bits,needed", [(16, 16, 0), (16, 16, 1), (16, 16, 7), (16, 16, 10**6),
                                                             (20, 12, 3), (0, 32, 2), (31, 1, 40)])
def test_apply_bin_reference_is_the_sorted_truth(mode, prefix_shift, prefix_bits, needed):
    """The reference narrows the bin by histogram passes (unlearn_ext/radix.py); the truth it must equal:
    every key above the bin, then the bin's keys by a stable descending sort (lower index first)."""
    scores = tied_list(torch.float32, "cpu", levels=4, sizes=(37, 1, 255, 6, 0, 640))
    keys, _ = RS.keys_of(scores, mode, 3, 1, 5)
    bin_key = int(torch.sort(keys, descending=True).values[300])  # a bin inside the list, with ties
    prefix = bin_key >> prefix_shift
    in_bin = torch.nonzero((keys >> (32 - prefix_bits)) == prefix).reshape(-1)
    truth = (keys >> (32 - prefix_bits)) > prefix
    order = torch.sort(keys[in_bin], descending=True, stable=True).indices
    truth[in_bin[order[:needed]]] = True
    masks = [torch.zeros(s.shape, dtype=torch.bool) for s in scores]
    params = [torch.zeros(s.shape) for s in scores]
    got = RS.select_apply_bin_(params, scores if mode != 2 else [], [], masks, mode, 3, 1, 5, prefix, prefix_bits,
                               needed, 1, 0.5, 0, 0)
    assert torch.equal(flat(masks), truth)
    assert int(got[0]) == int(truth.sum())


@pytest.mark.parametrize("by", ["abs", "value"])
@pytest.mark.parametrize("frac", [1e-4, 0.01, 0.3])
def test_pending_topk_equals_eager_resolution(by, frac):
    """The fused route (apply_ resolves the pending bin) and the histogram route (reading threshold
    first) give the same (threshold, boundary), the same perturbation, and the reference's top-K."""
    scores = make_list(BIG, LAYOUTS, torch.float32, "cpu", seed=22)
    fused, eager = S.topk(scores, frac, by=by), S.topk(scores, frac, by=by)
    assert fused.pending and eager.pending
    t, b = eager.threshold, eager.boundary  # resolved by the histogram passes
    assert not eager.pending
    p1 = make_list(BIG, LAYOUTS, torch.float32, "cpu", seed=23)
    p2 = [p.clone() for p in p1]
    c1, m1 = fused.apply_(p1, "dampen", 0.5, masks=True)
    c2, m2 = eager.apply_(p2, "dampen", 0.5, masks=True)
    assert (fused.threshold, fused.boundary) == (t, b) and c1 == c2 == fused.count
    assert torch.equal(flat(p1), flat(p2)) and torch.equal(flat(m1), flat(m2))
    assert torch.equal(flat(m1), reference_topk_mask(scores, fused.count, S.KEY_MODES[by]))


def test_pending_random_k_resolves_on_shapes():
    like = make_list(BIG, ["contiguous"], torch.float32, "cpu", seed=1)
    sel = S.random_k(like, 0.01, seed=5, offset=2)
    assert sel.pending
    got = selected_mask(sel, like)  # masks() resolves through the histogram passes on the shapes
    assert int(got.sum()) == sel.count
    assert torch.equal(got, reference_topk_mask(like, sel.count, 2, 5, 2))


@pytest.mark.parametrize("use", ["apply_", "threshold", "masks"])
def test_scores_written_in_place_after_selecting_are_refused(use):
    """Every use re-reads the scores, so writing to them between topk and use would select other
    coordinates silently; the selection refuses instead (and works on untouched scores)."""
    scores = [torch.randn(1000, generator=torch.Generator().manual_seed(4)), torch.randn(37)]
    sel = S.topk(scores, 0.05)
    scores[1].mul_(2.0)
    with pytest.raises(RuntimeError, match=r"score tensor\(s\) \[1\] were modified in place"):
        if use == "apply_":
            sel.apply_([torch.ones(1000), torch.ones(37)], "reset")
        elif use == "threshold":
            sel.threshold
        else:
            sel.masks(scores)
    fresh = S.topk(scores, 0.05)
    assert int(flat(fresh.masks(scores)).sum()) == fresh.count


def test_bracket_miss_falls_back_exactly():
    """Scores built against the evenly spaced sample (every sampled position small, the rest large):
    the bracket misses the k-th largest key, the plain first pass answers, the result is exact."""
    period, n = 20, 8192 * 20  # sample positions are i * period + period // 2
    gen = torch.Generator().manual_seed(3)
    v = torch.rand(n, generator=gen) + 1.0
    v[period // 2::period] = torch.rand(n // period, generator=gen) * 1e-3
    scores = [v[:50000].clone(), v[50000:].clone()]
    k = 1000
    assert S._first_digit_near(scores, 1, k, 0, 0, 0) is None
    sel = S.topk(scores, k)
    assert torch.equal(selected_mask(sel, scores), reference_topk_mask(scores, k))


def test_heavy_ties_take_the_histogram_route():
    """All-equal scores put every key in the threshold bin: more than CANDIDATE_CAP candidates, so
    the selection resolves eagerly (O(histogram) memory) and stays exact."""
    scores = [torch.full((S.CANDIDATE_CAP + 100,), 0.5), torch.full((7,), 0.5)]
    sel = S.topk(scores, 1000)
    assert not sel.pending and sel.boundary == 1000
    p = [torch.ones_like(s) for s in scores]
    count, _ = sel.apply_(p, "reset")
    assert count == 1000 and int((flat(p) == 0).sum()) == 1000 and bool((flat(p)[:1000] == 0).all())


# ---- Random-k and Bernoulli ---------------------------------------------------------------------------

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("k", [0, 1, 17, 299, 300])
def test_random_k_exact_and_equals_reference(device, k):
    like = make_list([37, 1, 255, 6, 1], LAYOUTS, torch.float32, device, seed=1)
    seed = 2**64 - (1 << 40) - 3  # high bit set (int64 -(2^40) - 3 in the op schema); seeds are unsigned
    sel = S.random_k(like, k, seed=seed, offset=5)
    got = selected_mask(sel, like)
    assert int(got.sum()) == k
    assert torch.equal(got, reference_topk_mask([t.cpu() for t in like], k, 2, seed, 5))


def test_random_k_is_uniform():
    """Chi-square on inclusion counts: T selections of K of N coordinates (seeds 0..T-1). Each count
    is Binomial(T, K/N) and the statistic / (1 - K/N) is about chi2(N - 1) (the counts sum to T*K).
    The threshold is chi2's 1 - 1e-6 quantile: a correct generator fails this with probability
    ~1e-6 (the seeds are fixed, so the test itself is deterministic)."""
    from scipy.stats import chi2
    n, k, trials = 40, 7, 3000
    like = [torch.zeros(n)]
    counts = torch.zeros(n)
    for seed in range(trials):
        counts += selected_mask(S.random_k(like, k, seed=seed), like).float()
    assert int(counts.sum()) == k * trials
    expected = trials * k / n
    stat = float(((counts - expected) ** 2 / expected).sum()) / (1 - k / n)
    assert stat < chi2.ppf(1 - 1e-6, n - 1), stat


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("p", [0.0, 0.013, 0.5, 1.0])
def test_bernoulli_is_philox_bernoulli(device, p):
    like = make_list([37, 1, 255, 6], LAYOUTS, torch.float32, device, seed=1)
    sel = S.bernoulli(like, p, seed=77, offset=9)
    got = selected_mask(sel, like)
    n = got.numel()
    want = reference.philox_bernoulli(torch.arange(n), 1, p, 77, 9).reshape(-1)
    assert torch.equal(got, want)


# ---- sharded selection: histograms add up ---------------------------------------------------------------

@pytest.mark.parametrize("mode", [0, 1, 2])
def test_two_halves_select_what_the_whole_selects(mode):
    scores = tied_list(torch.float32, "cpu", levels=6, sizes=(37, 1, 255, 6, 400, 33))
    halves = [scores[:3], scores[3:]]
    bases = [0, sum(s.numel() for s in halves[0])]
    k, seed, offset = 250, 8, 1
    whole = S._select(scores, mode, k, seed, offset)

    def histogram(prefix, prefix_bits, digit_bits):  # what an all-reduce over two ranks computes
        return sum(ops.select_histogram(h, mode, seed, offset, b, prefix, prefix_bits, digit_bits)
                   for h, b in zip(halves, bases))

    threshold, need, ties = S.resolve_threshold(histogram, k)
    assert threshold == whole.threshold
    # The ties each half holds at the threshold decide which half holds the boundary.
    boundary = S.ALL_TIES
    if need < ties:
        before = 0
        for h, b in zip(halves, bases):
            here = int(ops.select_histogram(h, mode, seed, offset, b, threshold >> 16, 16, 16)[threshold & 0xFFFF])
            if before + here >= need:
                boundary = int(ops.select_tie_boundary(h, mode, seed, offset, b, threshold, need - before))
                break
            before += here
    parts = []
    for h, b in zip(halves, bases):
        sel = S.Selection(mode, threshold, boundary, -1, 0, seed, offset, b, [] if mode == 2 else h)
        parts.append(selected_mask(sel, h))
    assert torch.equal(torch.cat(parts), selected_mask(whole, scores))
    assert int(torch.cat(parts).sum()) == k


# ---- int64 indexing ----------------------------------------------------------------------------------------

def test_indices_beyond_2_pow_32_via_base():
    """A shard whose first element has global index 2^33 + 5: the Philox subsequence's high word,
    the tie boundary and the selection rule all work on int64 indices."""
    like = make_list([300, 7], ["contiguous"], torch.float32, "cpu", seed=1)
    base = (1 << 33) + 5
    got = ops.select_histogram(like, 2, 3, 0, base, 0, 0, 12)
    assert torch.equal(got, RS.select_histogram(like, 2, 3, 0, base, 0, 0, 12))
    ties = [torch.zeros(300)]
    key = int(RS.order_key(torch.tensor([0.0]))[0])
    assert int(ops.select_tie_boundary(ties, 1, 0, 0, base, key, 17)) == base + 17
    count = ops.select_apply_(ties, ties, [], [], 1, 0, 0, base, key, base + 17, 1, 0.5, 0, 0)
    assert int(count) == 17


def _mem_available_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


@pytest.mark.slow
@pytest.mark.skipif(_mem_available_gib() < 12, reason="needs ~5 GiB for a list of more than 2^31 elements")
def test_list_above_2_pow_31_elements():
    """Two bf16 tensors of 2^30 + 5 elements (total above 2^31; torch.topk on their concatenation
    would need an int64-indexed copy of 4 GiB more): the planted top-3 and the tie boundary are
    found at global indices above 2^31."""
    n = (1 << 30) + 5
    a = torch.zeros(n, dtype=torch.bfloat16)
    b = torch.zeros(n, dtype=torch.bfloat16)
    b[-1], b[n // 2], a[3] = 3.0, 2.0, 1.0
    sel = S.topk([a, b], 3)
    assert sel.count == 3
    key0 = int(RS.order_key(torch.tensor([0.0]))[0])
    # K = 3 + 2^31: every planted value plus the first 2^31 zeros by index.
    big = S.topk([a, b], 3 + (1 << 31))
    # Two planted values (a[3], b[n // 2]) lie below the 2^31-th zero: the boundary is 2^31 + 2.
    assert big.threshold == key0 and big.boundary == (1 << 31) + 2
    count, _ = sel.apply_([a, b], "dampen", 0.5)
    assert count == 3 and float(b[-1]) == 1.5 and float(b[n // 2]) == 1.0 and float(a[3]) == 0.5


# ---- property test (docs/design.md §10): random lists, values with many ties, any K -----------------

from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 300), min_size=1, max_size=5), levels=st.integers(1, 40),
       by=st.sampled_from(["abs", "value"]), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31),
       frac=st.floats(0.0, 1.0))
def test_topk_property(sizes, levels, by, dtype, seed, frac):
    gen = torch.Generator().manual_seed(seed)
    scores = [(torch.randint(-levels, levels + 1, (n,), generator=gen).float() / levels).to(dtype) for n in sizes]
    n = sum(sizes)
    k = S.resolve_k(frac, n)
    sel = S.topk(scores, k, by=by)
    got = selected_mask(sel, scores) if n else torch.zeros(0, dtype=torch.bool)
    assert int(got.sum()) == k
    assert torch.equal(got, reference_topk_mask(scores, k, S.KEY_MODES[by]))
