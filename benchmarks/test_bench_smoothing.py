"""smooth+quantize on 11.7M fp32 parameters in 62 tensors (ResNet-18 shapes), DESIGN section 9.

Baselines in the same run: eager PyTorch (randn, add, compare, count) for `mc`; eager threshold +
margin for `analytic`; a plain copy for bandwidth; the pure-PyTorch reference (on a slice for `mc`,
whose Python-level Philox is too slow for the full list).
"""
from __future__ import annotations


import pytest
import torch

import unlearn_ext as ue
from unlearn_ext import reference
from unlearn_ext.pcmu.smoothing import analytic_threshold, radius_table
from workloads import DEVICE, gradient_list, run_timed

TAU, SIGMA, N0, N, ALPHA = 0.01, 0.01, 16, 64, 1e-3
REFERENCE_MC_ELEMENTS = 1 << 16



@pytest.fixture(scope="module")
def grads():
    return gradient_list(scale=TAU, device=DEVICE)


@pytest.fixture(scope="module")
def numel(grads):
    return sum(g.numel() for g in grads)


def _run(benchmark, fn, rounds):
    return run_timed(benchmark, fn, rounds, warmup_rounds=1)


# ---- mc, n = 64 -------------------------------------------------------------------------------

def eager_mc(grads, tau, sigma, n0, n, table):
    """What a practitioner writes today: concatenate, then per draw randn + add + compare + count."""
    v = torch.cat([g.reshape(-1).float() for g in grads])
    counts = torch.zeros(4, v.numel(), dtype=torch.int32, device=v.device)  # sel -, sel +, est -, est +
    for j in range(n0 + n):
        x = v + sigma * torch.randn_like(v)
        row = 0 if j < n0 else 2
        counts[row] += x < -tau
        counts[row + 1] += x > tau
    zero_sel = n0 - counts[0] - counts[1]
    c_a = torch.where((zero_sel >= counts[0]) & (zero_sel >= counts[1]), 0,
                      torch.where(counts[1] >= counts[0], 1, -1))
    k_a = torch.where(c_a == 0, n - counts[2] - counts[3], torch.where(c_a > 0, counts[3], counts[2]))
    t = table[k_a.long()]
    return torch.where(t > 0, c_a, 0).to(torch.int8), torch.where(t > 0, sigma * t, 0.0)


@pytest.mark.benchmark(group="mc n=64")
def test_mc_kernel(benchmark, record, grads, numel):
    # which CPU path ran (chosen at run time: the widest the CPU has), kept in the JSON
    benchmark.extra_info["cpu_isa"] = ue.build_info().get("cpu_isa", "n/a")
    _run(benchmark, lambda: ue.smooth_quantize(grads, tau=TAU, sigma=SIGMA, mode="mc", n0=N0, n=N), 5)
    record("mc/kernel", benchmark, elements=numel, draws=numel * (N0 + N))


@pytest.mark.benchmark(group="mc n=64")
def test_mc_eager(benchmark, record, grads, numel):
    table = radius_table(N, ALPHA, DEVICE)
    _run(benchmark, lambda: eager_mc(grads, TAU, SIGMA, N0, N, table), 2)
    record("mc/eager", benchmark, elements=numel, draws=numel * (N0 + N))


@pytest.mark.benchmark(group="mc n=64")
def test_mc_reference(benchmark, record, grads):
    part = [torch.cat([g.reshape(-1) for g in grads])[:REFERENCE_MC_ELEMENTS].cpu()]
    table = radius_table(N, ALPHA)
    _run(benchmark, lambda: reference.quantize_mc(part, TAU, SIGMA, N0, N, table, 0, 0, 0.0), 2)
    record("mc/reference", benchmark, elements=REFERENCE_MC_ELEMENTS, draws=REFERENCE_MC_ELEMENTS * (N0 + N))


# ---- analytic ---------------------------------------------------------------------------------

def eager_analytic(grads, beta):
    codes, radii, mins = [], [], []
    for g in grads:
        codes.append(((g > beta).to(torch.int8) - (g < -beta).to(torch.int8)))
        r = (g.abs() - beta).abs()
        radii.append(r)
        mins.append(r.min())
    return codes, radii, torch.stack(mins).min()


@pytest.mark.benchmark(group="analytic")
def test_analytic_kernel(benchmark, record, grads, numel):
    _run(benchmark, lambda: ue.smooth_quantize(grads, tau=TAU, sigma=SIGMA, mode="analytic"), 20)
    # reads 4 bytes, writes a 1-byte code and a 4-byte radius per element
    record("analytic/kernel", benchmark, elements=numel, bytes_moved=9 * numel)


@pytest.mark.benchmark(group="analytic")
def test_analytic_eager(benchmark, record, grads, numel):
    beta = analytic_threshold(TAU, SIGMA)
    _run(benchmark, lambda: eager_analytic(grads, beta), 10)
    record("analytic/eager", benchmark, elements=numel, bytes_moved=9 * numel)


@pytest.mark.benchmark(group="analytic")
def test_analytic_reference(benchmark, record, grads, numel):
    beta = analytic_threshold(TAU, SIGMA)
    _run(benchmark, lambda: reference.quantize_analytic(grads, beta, 0.0), 5)
    record("analytic/reference", benchmark, elements=numel, bytes_moved=9 * numel)


@pytest.mark.benchmark(group="analytic")
def test_copy_bandwidth(benchmark, record, grads, numel):
    src = torch.cat([g.reshape(-1) for g in grads])
    dst = torch.empty_like(src)
    _run(benchmark, lambda: dst.copy_(src), 20)
    record("copy/torch", benchmark, elements=numel, bytes_moved=8 * numel)


# ---- fused steps ------------------------------------------------------------------------------

@pytest.mark.benchmark(group="step")
def test_step_analytic_kernel(benchmark, record, grads, numel):
    params = [torch.zeros_like(g) for g in grads]
    _run(benchmark, lambda: ue.smooth_quantize_step_(params, grads, step_size=1e-3, tau=TAU, sigma=SIGMA), 20)
    # finite pre-scan (4) + gradient (4) + parameter read and write (8)
    record("step_analytic/kernel", benchmark, elements=numel, bytes_moved=16 * numel)


@pytest.mark.benchmark(group="step")
def test_step_analytic_eager(benchmark, record, grads, numel):
    params = [torch.zeros_like(g) for g in grads]
    beta = analytic_threshold(TAU, SIGMA)

    def step():
        codes, _, min_r = eager_analytic(grads, beta)
        torch._foreach_sub_(params, [c.to(p.dtype) * 1e-3 for c, p in zip(codes, params)])
        return min_r
    _run(benchmark, step, 10)
    record("step_analytic/eager", benchmark, elements=numel, bytes_moved=16 * numel)


@pytest.mark.benchmark(group="step")
def test_step_mc_kernel(benchmark, record, grads, numel):
    params = [torch.zeros_like(g) for g in grads]
    _run(benchmark, lambda: ue.smooth_quantize_step_(params, grads, step_size=1e-3, tau=TAU, sigma=SIGMA,
                                                     mode="mc", n0=N0, n=N), 5)
    record("step_mc/kernel", benchmark, elements=numel, draws=numel * (N0 + N))
