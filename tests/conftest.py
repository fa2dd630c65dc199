"""Shared fixtures and helpers of the unlearn_ext test suite.

Conventions used across the files:
* `devices()` parametrizes a test over 'cpu' and, where this build has CUDA kernels and a GPU is
  present, 'cuda' (marked `cuda`). On 'cuda' a test compares the CUDA result with the CPU kernel
  and with the pure-PyTorch reference; on 'cpu' with the reference.
* Kernel results are compared with `unlearn_ext.reference`, the truth (docs/design.md §2).
* `BACKENDS` / `served_by(backend)` run a test of the raw ops on the compiled kernels or on the
  reference kernels as the dispatcher serves them (the ops' default kernel).
* Monte-Carlo results may differ from the reference where a Phi threshold rounds differently
  (docs/design.md §3). `mc_compare` measures that rate, bounds it, and records it; the session
  summary prints the rates observed (`pytest -rA` or the default `-ra` shows the summary).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from collections import defaultdict

import numpy as np
import pytest
import torch

import unlearn_ext as ue
from unlearn_ext import ops as _ops, reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "transposed", "strided"]

requires_compiled = pytest.mark.skipif(not ue.compiled(), reason="compiled extension not loaded "
                                       "(backend is the reference)")

CUDA_OK = torch.cuda.is_available() and ue.cuda_built()


BACKENDS = ["compiled", "reference"]


@contextlib.contextmanager
def served_by(backend: str):
    """The raw ops served by `backend` for the duration. 'compiled' needs the extension (the test
    skips without it). 'reference' runs the reference kernels through the dispatcher: natively where
    the extension is not loaded (they are every op's default kernel), else registered for the CPU
    and CUDA keys over the compiled kernels, which come back when the block ends."""
    if backend == "compiled":
        if not ue.compiled():
            pytest.skip("compiled extension not loaded (backend is the reference)")
        yield
        return
    if not ue.compiled():
        yield
        return
    from unlearn_ext.ops import registry
    with torch.library._scoped_library("unlearn_ext", "IMPL") as lib:
        with warnings.catch_warnings():  # "overriding a previously registered kernel" is the point
            warnings.simplefilter("ignore")
            for name in registry.NAMES:
                for key in ("CPU", "CUDA"):
                    lib.impl(name, registry.reference_kernel(name), key)
        yield


def devices():
    """'cpu', plus 'cuda' when this build has CUDA kernels and a GPU is visible."""
    return ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not CUDA_OK, reason="needs a GPU and a CUDA build of unlearn_ext")])]


# ---- building inputs ------------------------------------------------------------------------------

def _factor(n: int) -> tuple[int, int]:
    """(a, b) with a * b = n and a, b > 1 where possible (so a transpose really is strided)."""
    for d in range(2, int(math.isqrt(n)) + 1):
        if n % d == 0:
            return d, n // d
    return (0, 4) if n == 0 else (n, 1)


def make_tensor(numel: int, layout: str = "contiguous", dtype=torch.float32, device="cpu",
                seed: int = 0, scale: float = 0.3, shift: float = 0.0) -> torch.Tensor:
    """numel values ~ N(shift, scale^2) laid out as asked:
    contiguous: 1-D; transposed: the transpose of an (a, b) matrix, a * b = numel (a 2-D view with
    swapped strides); strided: every other element of a twice-as-long buffer (a 1-D view, stride 2).
    The view is taken on the target device, so non-contiguity survives the move to CUDA."""
    gen = torch.Generator().manual_seed(seed)
    if layout == "contiguous":
        base = torch.randn(numel, generator=gen)
        view = lambda b: b  # noqa: E731
    elif layout == "transposed":
        a, b = _factor(numel)
        base = torch.randn(b, a, generator=gen)
        view = lambda t: t.t()  # noqa: E731
    elif layout == "strided":
        base = torch.randn(2 * numel, generator=gen)
        view = lambda t: t[1::2]  # noqa: E731
    else:
        raise ValueError(layout)
    base = (base * scale + shift).to(dtype=dtype, device=device)
    out = view(base)
    assert out.numel() == numel
    if numel > 1 and (layout == "strided" or (layout == "transposed" and min(_factor(numel)) > 1)):
        assert not out.is_contiguous()
    return out


def make_list(sizes, layouts=("contiguous",), dtype=torch.float32, device="cpu", seed=0,
              scale=0.3, shift=0.0):
    """A tensor list with the given sizes, cycling through the layouts."""
    return [make_tensor(s, layouts[i % len(layouts)], dtype, device, seed=seed + 7919 * i, scale=scale,
                        shift=shift) for i, s in enumerate(sizes)]


def make_params(grads, seed):
    """Parameters shaped like the gradients, cycling through: a plain tensor, the transpose of a
    matrix (a permuted view, where the gradient is 2-D) and the middle column of a (*shape, 3)
    tensor (stride 3). Returns (params, holders, covered): holders are the views' base tensors and
    covered marks the holder entries a view exposes; no other entry may ever change."""
    params, holders, covered = [], [], []
    gen = torch.Generator().manual_seed(seed)
    for i, g in enumerate(grads):
        shape, kind = tuple(g.shape), (2 * i) % 3
        if kind == 0:
            h = torch.randn(shape, generator=gen)
            view = lambda t: t  # noqa: E731
            mask = torch.ones(shape, dtype=torch.bool)
        elif kind == 1:
            h = torch.randn(shape[::-1], generator=gen)
            view = lambda t: t.permute(*range(t.dim() - 1, -1, -1))  # noqa: E731
            mask = torch.ones(shape[::-1], dtype=torch.bool)
        else:
            h = torch.randn(*shape, 3, generator=gen)
            view = lambda t: t[..., 1]  # noqa: E731
            mask = torch.zeros(*shape, 3, dtype=torch.bool)
            mask[..., 1] = True
        h = h.to(g.dtype).to(g.device)
        params.append(view(h))
        holders.append(h)
        covered.append(mask.to(g.device))
        assert params[-1].shape == g.shape
    return params, holders, covered


def to_cpu(tensors):
    return [t.detach().cpu() for t in tensors]


def signed64(v: int) -> int:
    """The schema's int64 view of an unsigned 64-bit seed or offset."""
    v = int(v) % 2**64
    return v - 2**64 if v >= 2**63 else v


# ---- comparing results ----------------------------------------------------------------------------

RADIUS_RTOL = 2.0**-23  # one float32 ulp: radii are float32 values computed the same way


def assert_lists_equal(a, b, what="tensor"):
    assert len(a) == len(b), f"{what}: {len(a)} vs {len(b)} tensors"
    for i, (x, y) in enumerate(zip(a, b)):
        x, y = x.detach().cpu(), y.detach().cpu()
        assert x.shape == y.shape, f"{what}[{i}]: shape {tuple(x.shape)} vs {tuple(y.shape)}"
        assert x.dtype == y.dtype, f"{what}[{i}]: dtype {x.dtype} vs {y.dtype}"
        assert torch.equal(x, y), f"{what}[{i}]: {int((x != y).sum())} of {x.numel()} entries differ"


def assert_radii_close(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == torch.float32
        torch.testing.assert_close(x.detach().cpu(), y.detach().cpu(), rtol=RADIUS_RTOL, atol=0.0)


def assert_quantize_equal(out, ref_out, *, shapes=None):
    """Op outputs (codes, radii, min_radius, counts) equal: codes and counts exactly, radii to one ulp."""
    codes, radii, min_r, counts = out
    r_codes, r_radii, r_min, r_counts = ref_out
    assert_lists_equal(codes, r_codes, "codes")
    assert_radii_close(radii, r_radii)
    assert min_r.dtype == torch.float32 and min_r.shape == ()
    assert counts.dtype == torch.int64 and counts.shape == (3,)
    torch.testing.assert_close(min_r.cpu(), r_min.cpu(), rtol=RADIUS_RTOL, atol=0.0)
    assert torch.equal(counts.cpu(), r_counts.cpu()), (counts, r_counts)
    if shapes is not None:
        assert [tuple(c.shape) for c in codes] == [tuple(s) for s in shapes]
        assert all(c.dtype == torch.int8 for c in codes)


# ---- Monte-Carlo mismatch accounting (docs/design.md §3) ------------------------------------------

MC_STATS: dict = defaultdict(lambda: [0, 0, 0])  # key -> [calls, elements, mismatched elements]


def mc_mismatch_bound(elements: int, draws: int) -> int:
    """Most mismatching elements tolerated between two mc implementations.

    A mismatch needs a draw whose 24-bit level lies exactly where the two implementations' integer
    thresholds differ. Assuming Phi differs by at most one level at each of an element's two
    thresholds, a draw hits such a level with probability <= 2 * 2^-24, so the expected number of
    mismatching elements is <= elements * draws * 2^-23 =: mu. We allow mu + 6 sqrt(mu) + 2: for a
    Poisson count that bound fails by chance with probability < 1e-6 even at the worst case, and
    in practice (the CPU kernel and the reference both use ATen's vectorized erfc) the count is 0.
    """
    mu = elements * draws * 2.0**-23
    return int(mu + 6.0 * math.sqrt(mu) + 2)


def mc_compare(out, ref_out, *, draws: int, key: str):
    """Compares quantize_mc-like outputs with a bounded, recorded number of mismatching elements.

    An element mismatches when its code or its radius differs. Where nothing mismatches, the
    outputs must agree exactly as in `assert_quantize_equal`. Returns the mismatch count."""
    codes, radii, min_r, counts = out
    r_codes, r_radii, r_min, r_counts = ref_out
    assert len(codes) == len(r_codes) == len(radii) == len(r_radii)
    elements = mismatched = 0
    for c, rc, r, rr in zip(codes, r_codes, radii, r_radii):
        c, rc, r, rr = c.cpu(), rc.cpu(), r.cpu(), rr.cpu()
        assert c.shape == rc.shape and c.dtype == rc.dtype == torch.int8
        assert r.shape == rr.shape and r.dtype == rr.dtype == torch.float32
        bad = (c != rc) | ~torch.isclose(r, rr, rtol=RADIUS_RTOL, atol=0.0)
        elements += c.numel()
        mismatched += int(bad.sum())
    stat = MC_STATS[key]
    stat[0] += 1
    stat[1] += elements
    stat[2] += mismatched
    bound = mc_mismatch_bound(elements, draws)
    assert mismatched <= bound, f"{mismatched} of {elements} elements differ (bound {bound})"
    if mismatched == 0:
        assert_quantize_equal(out, ref_out)
    else:  # each mismatching element moves each statistic count by at most one
        diff = (counts.cpu() - r_counts.cpu()).abs()
        assert int(diff[1]) == 0 and int(diff.max()) <= mismatched
    return mismatched


def pytest_terminal_summary(terminalreporter):
    if not MC_STATS:
        return
    tr = terminalreporter
    tr.section("Monte-Carlo codes: kernel vs reference mismatch rates (docs/design.md §3)")
    total_e = total_m = 0
    for key in sorted(MC_STATS):
        calls, elements, mismatched = MC_STATS[key]
        total_e += elements
        total_m += mismatched
        rate = mismatched / elements if elements else 0.0
        tr.write_line(f"{key:<40s} calls={calls:<5d} elements={elements:<10d} "
                      f"mismatched={mismatched:<4d} rate={rate:.3g}")
    rate = total_m / total_e if total_e else 0.0
    tr.write_line(f"{'all':<40s} elements={total_e} mismatched={total_m} rate={rate:.3g}")


# ---- statistics ----------------------------------------------------------------------------------

def chi_square_gof(observed, probs, false_failure: float = 1e-6):
    """Chi-square goodness of fit of category counts to probabilities. Categories expected to hold
    fewer than 5 counts are merged into the largest one (the chi-square approximation needs that).
    Returns (statistic, critical value at the given false-failure rate, degrees of freedom)."""
    from scipy import stats

    observed = np.asarray(observed, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    total = observed.sum()
    expected = probs / probs.sum() * total
    small = expected < 5
    big = int(np.argmax(expected))
    small[big] = False
    obs = np.append(observed[~small], 0.0)
    exp = np.append(expected[~small], 0.0)
    # merge the small categories into the largest one
    keep_big = int(np.flatnonzero(~small).tolist().index(big))
    obs[keep_big] += observed[small].sum()
    exp[keep_big] += expected[small].sum()
    obs, exp = obs[:-1], exp[:-1]
    dof = len(obs) - 1
    if dof == 0:
        return 0.0, 0.0, 0
    stat = float(((obs - exp) ** 2 / exp).sum())
    return stat, float(stats.chi2.ppf(1.0 - false_failure, dof)), dof


@pytest.fixture
def ops():
    """The op wrappers (compiled op, or the reference in reference mode)."""
    return _ops


@pytest.fixture
def ref():
    return reference
