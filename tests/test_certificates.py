"""Radii and probabilities against independent scipy computations (docs/design.md §4)."""
import numpy as np
import pytest
import torch
from scipy import optimize, stats

import unlearn_ext as ue
from unlearn_ext.pcmu.smoothing import analytic_threshold, radius_table


def scipy_beta(tau, sigma):
    """Independent: root of p+(v) = p0(v) on [0, tau] with scipy.stats.norm, else 0."""
    def f(v):
        p_pos = stats.norm.sf((tau - v) / sigma)
        p_zero = stats.norm.cdf((tau - v) / sigma) - stats.norm.cdf((-tau - v) / sigma)
        return p_pos - p_zero
    if f(0.0) >= 0:
        return 0.0
    return optimize.brentq(f, 0.0, tau, xtol=1e-15, rtol=1e-15)


@pytest.mark.parametrize("tau,sigma", [(0.5, 1.0), (0.1, 0.005), (1.0, 0.3), (0.3, 0.6), (2.0, 0.1)])
def test_beta_matches_scipy(tau, sigma):
    assert analytic_threshold(tau, sigma) == pytest.approx(scipy_beta(tau, sigma), abs=1e-9)


def test_beta_properties():
    assert analytic_threshold(0.4, 1.0) == 0.0  # tau/sigma <= 0.43: sign quantizer
    assert analytic_threshold(0.44, 1.0) > 0.0
    assert analytic_threshold(1.0, 0.01) == pytest.approx(1.0, abs=0.01)
    for tau, sigma in [(0.5, 1.0), (1.0, 0.5), (0.2, 0.05)]:
        assert 0.0 <= analytic_threshold(tau, sigma) <= tau


@pytest.mark.parametrize("tau,sigma", [(0.5, 1.0), (0.1, 0.005), (0.3, 1.0)])
def test_analytic_codes_are_argmax_and_radii_sound(tau, sigma):
    v = torch.linspace(-3 * tau - 0.1, 3 * tau + 0.1, 200_001, dtype=torch.float32)
    res = ue.smooth_quantize([v], tau=tau, sigma=sigma, mode="analytic")
    x = v.double().numpy()
    p_pos = stats.norm.sf((tau - x) / sigma)
    p_neg = stats.norm.cdf((-tau - x) / sigma)
    p_zero = 1.0 - p_pos - p_neg
    argmax = np.where((p_zero >= p_pos) & (p_zero >= p_neg), 0, np.where(p_pos > p_neg, 1, -1))
    codes = res.codes[0].numpy()
    # The kernel's boundary is float32(beta); only points within float rounding of it may differ.
    beta_f = float(np.float32(analytic_threshold(tau, sigma)))
    near = np.abs(np.abs(x) - scipy_beta(tau, sigma)) < 1e-6
    assert np.all((codes == argmax) | near)
    exact = np.abs(np.abs(x) - beta_f)
    r = res.radii[0].double().numpy()
    assert np.all(r <= exact)
    assert np.all(r >= exact * (1 - 1e-6) - 1e-30)


def test_radius_table_against_clopper_pearson():
    n, alpha = 64, 1e-3
    table = radius_table(n, alpha).double().numpy()
    for k in range(n + 1):
        low = stats.binomtest(k, n).proportion_ci(confidence_level=1 - 2 * alpha, method="exact").low if k else 0.0
        if low > 0.5:
            exact = stats.norm.ppf(low)
            assert table[k] <= exact and table[k] == pytest.approx(exact, rel=1e-6)
        else:
            assert table[k] <= 0


@pytest.mark.parametrize("v", [0.0, 0.12, 0.2, -0.27])
def test_mc_draw_frequencies_match_probabilities(v):
    """With n0 = 1 the code's class is the first draw's class when the certificate holds; instead we
    count draws directly: estimation counts of many elements with the same v follow the class
    probabilities. A chi-square test (2 dof) at threshold 25 fails by chance with prob ~4e-6."""
    tau, sigma, n = 0.2, 0.1, 64
    elements = 4096
    grads = [torch.full((elements,), v)]
    # Recover per-class counts through vote-free means: code and abstention depend on the counts,
    # so use the reference-compatible uniforms directly with the kernel's thresholds.
    u = ue.philox_uniform(torch.arange(elements), n, seed=99).reshape(-1)
    p_pos = stats.norm.sf((tau - v) / sigma)
    p_neg = stats.norm.cdf((-tau - v) / sigma)
    neg = int((u < p_neg).sum())
    pos = int((u > 1 - p_pos).sum())
    total = u.numel()
    expected = np.array([p_neg, 1 - p_neg - p_pos, p_pos]) * total
    observed = np.array([neg, total - neg - pos, pos])
    mask = expected > 0
    chi2 = float((((observed - expected) ** 2)[mask] / expected[mask]).sum())
    assert chi2 < 25, chi2
    # A certificate claims its class has probability > 1/2; Clopper-Pearson makes a false claim
    # happen with probability <= alpha per coordinate. Bound the count at alpha*N + 5 sd + 1.
    alpha = 1e-3
    res = ue.smooth_quantize(grads, tau=tau, sigma=sigma, mode="mc", n0=16, n=n, alpha=alpha, seed=5)
    probs = {-1: p_neg, 0: 1 - p_neg - p_pos, 1: p_pos}
    certified = res.radii[0] > 0
    false_claims = sum(1 for c, ok in zip(res.codes[0].tolist(), certified.tolist())
                       if ok and probs[c] <= 0.5)
    assert false_claims <= alpha * elements + 5 * np.sqrt(alpha * elements) + 1
    if max(probs.values()) > 0.9:  # a clear majority class is certified almost everywhere
        assert float(certified.float().mean()) > 0.9


def test_mc_radii_sound_on_grid():
    """Certified radii never exceed the exact distance to where the true top class stops being the
    argmax (checked where the certificate is made; alpha-level failures bounded)."""
    tau, sigma = 0.2, 0.1
    v = torch.linspace(-0.6, 0.6, 4001)
    res = ue.smooth_quantize([v], tau=tau, sigma=sigma, mode="mc", n0=16, n=256, seed=1)
    beta = scipy_beta(tau, sigma)
    x = v.double().numpy()
    exact = np.abs(np.abs(x) - beta)
    r = res.radii[0].double().numpy()
    violations = (r > exact + 1e-7).mean()
    assert violations <= 3e-3
