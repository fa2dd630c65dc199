"""PCMU per-step cost (DESIGN section 4 and 9), same run: plain SGD, the PCMU step (per-sample
clipping with torch.func, fused smoothing kernels, fragile-set compaction) and an eager
implementation of the same step, for `analytic`, `mc` and framework D; and the cost of a
per-request check against retraining from scratch.

Workload: an MLP 64-256-256-10 (85k parameters) on sklearn's digits, batch 256, C = 1.
"""
from __future__ import annotations

import pytest
import torch

from unlearn_ext.pcmu import PCMUTrainer
from unlearn_ext.pcmu.examples import SETTINGS, load, _trainer as _example_trainer
from unlearn_ext.per_sample import clipped_per_sample
from unlearn_ext.pcmu.smoothing import analytic_threshold

B, C, TAU, SIGMA, N0, N = 256, 1.0, 0.006, 0.01, 4, 16
LOSS = torch.nn.functional.cross_entropy


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 256), torch.nn.Tanh(),
                               torch.nn.Linear(256, 10))


@pytest.fixture(scope="module")
def data():
    x, y, _, _ = load("digits")
    return x, y


def _trainer(data, mode="analytic", framework="G"):
    return PCMUTrainer(_mlp(), LOSS, data, batch_size=B, clip_norm=C, lr=0.01, tau=TAU, sigma=SIGMA, mode=mode,
                       n0=N0, n=N, framework=framework, sigma_data=0.1 if framework == "D" else None, max_request=2)


def _elements(trainer):
    return trainer.coordinates * B  # per-sample gradient entries per step


def test_plain_sgd_step(benchmark, record, data):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = data[0][:B], data[1][:B]

    def step():
        opt.zero_grad()
        LOSS(model(x), y).backward()
        opt.step()
    benchmark.pedantic(step, rounds=30, iterations=1, warmup_rounds=2)
    record("pcmu_step/plain_sgd", benchmark, elements=_elements(_trainer(data)))


@pytest.mark.parametrize("mode", ["analytic", "mc"])
def test_pcmu_step(benchmark, record, data, mode):
    trainer = _trainer(data, mode)
    ids = trainer.schedule.step(0).ids
    benchmark.pedantic(lambda: trainer._compute_step(0, ids), rounds=15, iterations=1, warmup_rounds=2)
    record(f"pcmu_step_{mode}/pcmu", benchmark, elements=_elements(trainer))


def test_pcmu_step_framework_d(benchmark, record, data):
    trainer = _trainer(data, "mc", "D")
    ids = trainer.schedule.step(0).ids
    benchmark.pedantic(lambda: trainer._compute_step(0, ids), rounds=3, iterations=1, warmup_rounds=1)
    record("pcmu_step_D/pcmu", benchmark, elements=_elements(trainer))


# ---- eager implementations of the same steps ------------------------------------------------------

def _eager_clipped_mean(model, x, y):
    """What a research script writes: a Python loop over samples, backward, clip, accumulate."""
    params = [p for p in model.parameters()]
    total = [torch.zeros_like(p) for p in params]
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(LOSS(model(x[i:i + 1]), y[i:i + 1]), params)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        scale = min(1.0, C / (float(norm) + 1e-12))
        for t, g in zip(total, grads):
            t.add_(g, alpha=scale)
    return [t / B for t in total]


def _eager_quantize(v, mode):
    flat = torch.cat([t.reshape(-1) for t in v])
    if mode == "analytic":
        beta = analytic_threshold(TAU, SIGMA)
        codes = (flat > beta).to(torch.int8) - (flat < -beta).to(torch.int8)
        radii = (flat.abs() - beta).abs()
    else:  # n0 + n noisy draws per coordinate, counted; radius from the empirical majority
        counts = torch.zeros(3, flat.numel())
        for _ in range(N0 + N):
            z = flat + SIGMA * torch.randn_like(flat)
            counts[0] += z < -TAU
            counts[2] += z > TAU
        counts[1] = N0 + N - counts[0] - counts[2]
        top, arg = counts.max(0)
        codes = (arg - 1).to(torch.int8)
        p = (top / (N0 + N)).clamp(max=1 - 1e-6)
        radii = torch.where(p > 0.5, SIGMA * torch.special.ndtri(p), torch.zeros_like(p))
    return codes, radii


def _eager_step(model, x, y, mode, fragile_threshold):
    v = _eager_clipped_mean(model, x, y)
    codes, radii = _eager_quantize(v, mode)
    fragile = torch.nonzero(radii < fragile_threshold).reshape(-1)
    with torch.no_grad():
        pos = 0
        for p in model.parameters():
            p.sub_(0.01 * codes[pos:pos + p.numel()].view_as(p).float())
            pos += p.numel()
    return fragile


@pytest.mark.parametrize("mode", ["analytic", "mc"])
def test_eager_step(benchmark, record, data, mode):
    model = _mlp()
    x, y = data[0][:B], data[1][:B]
    benchmark.pedantic(lambda: _eager_step(model, x, y, mode, 2 * C / B), rounds=3, iterations=1, warmup_rounds=1)
    record(f"pcmu_step_{mode}/eager", benchmark, elements=_elements(_trainer(data)))


def test_vmap_clipping_alone(benchmark, record, data):
    """The dominant cost of a PCMU step, for reference: per-sample clipped gradients via torch.func."""
    model = _mlp()
    x, y = data[0][:B], data[1][:B]
    benchmark.pedantic(lambda: clipped_per_sample(model, LOSS, x, y, C), rounds=15, iterations=1, warmup_rounds=2)
    record("pcmu_step/vmap_clipping_only", benchmark, elements=_elements(_trainer(data)))


# ---- per-request check vs retraining (the digits example's setting) ----------------------------------

def _digits_example_trainer(data, exclude=None):
    """The digits example's trainer (pcmu.examples), on data loaded once by the fixture."""
    return _example_trainer("digits", data[0], data[1], seed=0, mode="analytic", exclude=exclude)


def test_request_check(benchmark, record, data):
    trainer = _digits_example_trainer(data).train(epochs=SETTINGS["digits"]["epochs"])
    # A request the check must follow through every epoch (a passing one is the most expensive):
    # pick the first single id that is certified, else the one that diverges latest.
    checks = [(trainer.check_request([i]), i) for i in range(40)]
    passing = [i for c, i in checks if c.certified]
    target = passing[0] if passing else max(checks, key=lambda ci: ci[0].first_divergent_step)[1]
    benchmark.pedantic(lambda: trainer.check_request([target]), rounds=10, iterations=1, warmup_rounds=1)
    record("request/check", benchmark, elements=1)


def test_request_retrain(benchmark, record, data):
    """Retraining from scratch without the id: building the trainer and training (data already loaded)."""
    epochs = SETTINGS["digits"]["epochs"]
    benchmark.pedantic(lambda: _digits_example_trainer(data, torch.tensor([3])).train(epochs=epochs), rounds=3,
                       iterations=1, warmup_rounds=1)
    record("request/retrain", benchmark, elements=1)
