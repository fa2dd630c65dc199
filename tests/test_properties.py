"""Hypothesis drives the kernels against the reference with random shapes and values."""
import torch
from hypothesis import given, settings, strategies as st

import unlearn_ext as ue
from unlearn_ext import reference
from unlearn_ext.pcmu.smoothing import analytic_threshold, radius_table

sizes = st.lists(st.integers(min_value=0, max_value=300), min_size=1, max_size=4)
floats = st.floats(min_value=-2.0, max_value=2.0, width=32, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(sizes=sizes, tau=st.floats(0.0, 1.0), sigma=st.floats(0.01, 2.0), seed=st.integers(0, 2**31),
       scale=st.floats(1e-3, 3.0))
def test_analytic_property(sizes, tau, sigma, seed, scale):
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(s, generator=gen) * scale for s in sizes]
    res = ue.smooth_quantize(grads, tau=tau, sigma=sigma)
    codes, radii, _, counts = reference.quantize_analytic(grads, analytic_threshold(tau, sigma), 0.0)
    assert all(torch.equal(a, b) for a, b in zip(res.codes, codes))
    assert all(torch.equal(a, b) for a, b in zip(res.radii, radii))
    assert torch.equal(res.counts, counts)


@settings(max_examples=25, deadline=None)
@given(sizes=sizes, tau=st.floats(0.0, 0.5), sigma=st.floats(0.05, 1.0), seed=st.integers(0, 2**62),
       offset=st.integers(0, 2**40), n0=st.integers(1, 9), n=st.integers(1, 40))
def test_mc_property(sizes, tau, sigma, seed, offset, n0, n):
    gen = torch.Generator().manual_seed(seed % 2**31)
    grads = [torch.randn(s, generator=gen) * 0.5 for s in sizes]
    res = ue.smooth_quantize(grads, tau=tau, sigma=sigma, mode="mc", n0=n0, n=n, seed=seed, offset=offset)
    codes, _, _, counts = reference.quantize_mc(grads, tau, sigma, n0, n, radius_table(n), seed, offset, 0.0)
    mismatched = sum(int((a != b).sum()) for a, b in zip(res.codes, codes))
    assert mismatched <= 1  # docs/design.md §3: a Phi threshold may round differently, rarely
