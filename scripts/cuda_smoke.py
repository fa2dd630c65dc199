"""Runs every op on CUDA and checks it against the CPU kernel (same bits where the contract says
so). Small sizes: meant to run under compute-sanitizer."""
import sys

import torch

import unlearn_ext as ue
from unlearn_ext.smoothing import radius_table

assert torch.cuda.is_available() and ue.cuda_built(), "needs a CUDA build and a GPU"
ops = torch.ops.unlearn_ext
failures = []


def check(name, ok):
    print(f"{'ok  ' if ok else 'FAIL'} {name}")
    if not ok:
        failures.append(name)


def same(a, b):
    if isinstance(a, (list, tuple)):
        return all(same(x, y) for x, y in zip(a, b)) and len(a) == len(b)
    return torch.equal(a.cpu(), b.cpu())


def close(a, b):
    return all(torch.allclose(x.cpu(), y.cpu(), rtol=1e-6, atol=0) for x, y in zip(a, b))


idx = torch.cat([torch.arange(1000), torch.tensor([2**32 + 5, -1])])
for name in ("philox_bits", "philox_uniform"):
    check(name, same(getattr(ops, name)(idx.cuda(), 7, 11, 2**32 - 1), getattr(ops, name)(idx, 7, 11, 2**32 - 1)))
check("philox_bernoulli", same(ops.philox_bernoulli(idx.cuda(), 7, 0.3, 11, 3), ops.philox_bernoulli(idx, 7, 0.3, 11, 3)))

for dtype in (torch.float32, torch.float16, torch.bfloat16):
    gen = torch.Generator().manual_seed(0)
    cpu = [(torch.randn(s, generator=gen) * 0.3).to(dtype) for s in (0, 1, 255, 4099, 70001)]
    gpu = [g.cuda() for g in cpu]
    table = radius_table(24)
    a = ops.quantize_analytic(cpu, 0.12, 0.05)
    b = ops.quantize_analytic(gpu, 0.12, 0.05)
    check(f"quantize_analytic {dtype}", same(a[0], b[0]) and close(a[1], b[1]) and same(a[3], b[3]))
    a = ops.quantize_mc(cpu, 0.2, 0.25, 8, 24, table, 5, 9, 0.05)
    b = ops.quantize_mc(gpu, 0.2, 0.25, 8, 24, table.cuda(), 5, 9, 0.05)
    mism = sum(int((x.cpu() != y.cpu()).sum()) for x, y in zip(a[0], b[0]))
    check(f"quantize_mc {dtype} (code mismatches from Phi rounding: {mism})", mism <= 2)
    for mode in ("analytic", "mc"):
        pc = [torch.randn(g.shape).to(dtype) for g in cpu]
        pg = [p.cuda() for p in pc]
        kw = dict(tau=0.2, sigma=0.25, mode=mode, n0=8, n=24, seed=5, offset=9)
        sa = ue.smooth_quantize_step_(pc, cpu, step_size=0.01, **kw)
        sb = ue.smooth_quantize_step_(pg, gpu, step_size=0.01, **kw)
        check(f"step {mode} {dtype}", (mode == "mc" or same(pc, pg)) and (mode == "mc" or same(sa.counts, sb.counts)))
    bad = [g.clone() for g in gpu]
    bad[3][7] = float("nan")
    pg = [torch.zeros_like(g) for g in gpu]
    s = ue.smooth_quantize_step_(pg, bad, step_size=0.01, tau=0.2, sigma=0.25, nonfinite="skip")
    check(f"step skips non-finite {dtype}", (not s.applied) and all(int(p.abs().sum()) == 0 for p in pg))

like = [torch.zeros(37, 3), torch.zeros(5)]
vc, vg = ue.VoteCounter(like, tau=0.1, sigma_data=0.5, n0=4, n=12), ue.VoteCounter([t.cuda() for t in like], tau=0.1, sigma_data=0.5, n0=4, n=12)
gen = torch.Generator().manual_seed(1)
for _ in range(16):
    gs = [torch.randn(t.shape, generator=gen) * 0.2 for t in like]
    vc.add(gs)
    vg.add([g.cuda() for g in gs])
check("vote_accumulate_", same(vc.selection + vc.estimation, vg.selection + vg.estimation))
ra, rb = vc.finalize(), vg.finalize()
check("vote_finalize", same(ra.codes, rb.codes) and close(ra.radii, rb.radii) and same(ra.counts, rb.counts))
torch.cuda.synchronize()
print("failures:", failures)
sys.exit(1 if failures else 0)
