"""PCMU per-step cost (DESIGN section 4 and 9), same run: plain SGD, the PCMU step (closed-form
per-sample clipping, per_sample/engine.py; fused smoothing kernels; fragile-set compaction), opacus'
DP-SGD step with ghost clipping, and an eager implementation of the same step, for `analytic`, `mc`
and framework D; and the cost of a per-request check against retraining from scratch.

Workloads: the benchmark MLP 64-256-256-10 (85k parameters) and a wide MLP 64-1024-1024-10 (1.1M)
on sklearn's digits, batch 256, C = 1. The clipped sums' accuracy against a float64 per-sample loop
is written to the run's notes.
"""
from __future__ import annotations

import copy

import pytest
import torch

from unlearn_ext.pcmu import PCMUTrainer
from unlearn_ext.evaluate.pcmu_examples import SETTINGS, load, _trainer as _example_trainer
from unlearn_ext.per_sample import clipped_per_sample, clipped_sum64
from unlearn_ext.pcmu.smoothing import analytic_threshold

B, C, TAU, SIGMA, N0, N = 256, 1.0, 0.006, 0.01, 4, 16
LOSS = torch.nn.functional.cross_entropy


WIDTHS = {"mlp": 256, "wide": 1024}  # hidden widths: the benchmark MLP, the wide MLP of DESIGN section 9


def _mlp(kind="mlp"):
    torch.manual_seed(0)
    h = WIDTHS[kind]
    return torch.nn.Sequential(torch.nn.Linear(64, h), torch.nn.Tanh(), torch.nn.Linear(h, h), torch.nn.Tanh(),
                               torch.nn.Linear(h, 10))


def _prefix(kind):
    return "" if kind == "mlp" else f"{kind}_"


@pytest.fixture(scope="module")
def data():
    x, y, _, _ = load("digits")
    return x, y


def _trainer(data, mode="analytic", framework="G", kind="mlp"):
    return PCMUTrainer(_mlp(kind), LOSS, data, batch_size=B, clip_norm=C, lr=0.01, tau=TAU, sigma=SIGMA, mode=mode,
                       n0=N0, n=N, framework=framework, sigma_data=0.1 if framework == "D" else None, max_request=2)


def _elements(trainer):
    return trainer.coordinates * B  # per-sample gradient entries per step


@pytest.mark.parametrize("kind", list(WIDTHS))
def test_plain_sgd_step(benchmark, record, data, kind):
    model = _mlp(kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = data[0][:B], data[1][:B]

    def step():
        opt.zero_grad()
        LOSS(model(x), y).backward()
        opt.step()
    benchmark.pedantic(step, rounds=30, iterations=1, warmup_rounds=2)
    record(f"{_prefix(kind)}pcmu_step/plain_sgd", benchmark, elements=_elements(_trainer(data, kind=kind)))


@pytest.mark.parametrize("kind,mode", [("mlp", "analytic"), ("mlp", "mc"), ("wide", "analytic")])
def test_pcmu_step(benchmark, record, compare, data, mode, kind):
    trainer = _trainer(data, mode, kind=kind)
    ids = trainer.schedule.step(0).ids
    benchmark.pedantic(lambda: trainer._compute_step(0, ids), rounds=15, iterations=1, warmup_rounds=2)
    key = f"{_prefix(kind)}pcmu_step_{mode}/pcmu"
    record(key, benchmark, elements=_elements(trainer))
    if mode == "analytic":
        # ratios of step rates: < 1 means PCMU is slower (the targets: >= 1.0 vs ghost, >= 0.2 vs SGD)
        compare(f"{key} vs {_prefix(kind)}opacus_ghost_step (rate)", key, f"{_prefix(kind)}pcmu_step/opacus_ghost")
        compare(f"{key} vs {_prefix(kind)}plain_sgd (rate)", key, f"{_prefix(kind)}pcmu_step/plain_sgd")


@pytest.mark.parametrize("kind", list(WIDTHS))
def test_opacus_ghost_clipping_step(benchmark, record, data, kind):
    """What practitioners use today: opacus' DP-SGD step with ghost clipping (per-sample norms from
    activations and output gradients, then a second backward of the clipped loss), noise included."""
    opacus = pytest.importorskip("opacus")
    from torch.utils.data import DataLoader, TensorDataset
    import warnings
    model = _mlp(kind)
    x, y = data[0][:B], data[1][:B]
    loader = DataLoader(TensorDataset(x, y), batch_size=B)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, opt, criterion, _ = opacus.PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01), data_loader=loader,
            criterion=torch.nn.CrossEntropyLoss(), noise_multiplier=1.0, max_grad_norm=C, grad_sample_mode="ghost",
            poisson_sampling=False)

    def step():
        opt.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        opt.step()
    benchmark.pedantic(step, rounds=30, iterations=1, warmup_rounds=2)
    record(f"{_prefix(kind)}pcmu_step/opacus_ghost", benchmark, elements=_elements(_trainer(data, kind=kind)))


@pytest.mark.parametrize("kind", list(WIDTHS))
def test_clipped_sum_alone_and_its_accuracy(benchmark, record, note, data, kind):
    """The clipped sum of a PCMU step on its own, and its relative error (Frobenius norm over all
    parameters) against an eager per-sample loop in float64 -- on a float64 copy of the model (what
    the closed forms add) and on the float32 model (what the float32 forward pass adds)."""
    model = _mlp(kind)
    x, y = data[0][:B], data[1][:B]
    benchmark.pedantic(lambda: clipped_sum64(model, LOSS, x, y, C), rounds=15, iterations=1, warmup_rounds=2)
    record(f"{_prefix(kind)}pcmu_step/clipped_sum64_only", benchmark, elements=_elements(_trainer(data, kind=kind)))
    double = copy.deepcopy(model).double()
    want = _loop_clipped_sum64(double, x.double(), y)
    for label, m, inputs in (("float64 model", double, x.double()), ("float32 model", model, x)):
        got = clipped_sum64(m, LOSS, inputs, y, C)
        err = sum(float((got[k] - want[k]).pow(2).sum()) for k in want) ** 0.5
        ref = sum(float(want[k].pow(2).sum()) for k in want) ** 0.5
        note(f"{_prefix(kind)}clipped_sum64 relative error vs float64 loop ({label})", err / ref)


def _loop_clipped_sum64(model, x, y):
    params = dict(model.named_parameters())
    total = {k: torch.zeros_like(p) for k, p in params.items()}
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(LOSS(model(x[i:i + 1]), y[i:i + 1]), list(params.values()))
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        scale = torch.clamp(C / norm, max=1.0)
        for k, g in zip(params, grads):
            total[k] += g * scale
    return total


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
    """The digits example's trainer (evaluate.pcmu_examples), on data loaded once by the fixture."""
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


@pytest.mark.parametrize("route", ["backward", "recomputed"])
def test_user_loop_step(benchmark, record, compare, data, route):
    """One step of the user's own loop with make_unlearnable(method="pcmu") (zero_grad, forward,
    mean loss, backward, PCMUOptimizer.step) on the benchmark MLP, b = 256: per-sample sums taken
    from the user's backward pass vs recomputed from the batch (the route for loops it cannot use).
    The data are cut to whole batches of 256, so every step can take the backward route."""
    from unlearn_ext import TrainingData, UnlearningEngine
    x, y = data
    n = (x.shape[0] // B) * B
    model = _mlp()
    rounds, warmup = 15, 2
    steps_per_epoch = n // B
    epochs = -(-(rounds + warmup) // steps_per_epoch)
    model, opt, loader = UnlearningEngine().make_unlearnable(
        model, torch.optim.SGD(model.parameters(), lr=0.01), TrainingData(x[:n], y[:n]), batch_size=B,
        method="pcmu", epochs=epochs, loss_fn=torch.nn.CrossEntropyLoss(), clip_norm=C, tau=TAU, sigma=SIGMA,
        max_request=2)
    if route == "recomputed":
        opt.capture.close()  # no hooks: every step recomputes
    batches = (batch for _ in range(epochs) for batch in loader)

    def step():
        bx, by = next(batches)
        opt.zero_grad()
        LOSS(model(bx), by).backward()
        opt.step()
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=warmup)
    assert opt.sources[route] == rounds + warmup
    record(f"pcmu_user_loop/{route}", benchmark, elements=_elements(_trainer(data)))
    if route == "recomputed":
        compare("pcmu_user_loop/backward vs pcmu_user_loop/recomputed (rate)", "pcmu_user_loop/backward",
                "pcmu_user_loop/recomputed")
        compare("pcmu_user_loop/backward vs pcmu_step/plain_sgd (rate)", "pcmu_user_loop/backward",
                "pcmu_step/plain_sgd")
