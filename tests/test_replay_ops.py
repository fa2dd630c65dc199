"""The DeltaGrad replay's ops (ops/schemas.py: layer_chain_grad_sums_, deltagrad_qn_step_,
deltagrad_qn_run_): the compiled CPU kernels give the reference's numbers bit for bit (the reference
is the replay's former Python arithmetic: the same ATen calls in the same order), the chain's
gradients are autograd's up to float rounding in float32 and float64, the step is its formula, a run
is the replay's per-step calls in turn, and bad rows are refused before any work on every backend
(tests/test_opcheck.py has the op-level checks and the other bad inputs)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import unlearn_ext as ue
from unlearn_ext import chain_format

from conftest import BACKENDS, served_by

OPS = torch.ops.unlearn_ext
CODES = {nn.Tanh: chain_format.TANH, nn.Sigmoid: chain_format.SIGMOID, nn.ReLU: chain_format.RELU}

# (leading Flatten, layers): Linear(in, out, bias) as a tuple, activations as classes
CHAINS = {
    "linear": (False, [(6, 4, True)]),
    "tanh_mlp": (False, [(6, 8, True), nn.Tanh, (8, 4, True)]),
    "flatten_relu_sigmoid": (True, [(6, 5, False), nn.ReLU, (5, 7, True), nn.Sigmoid, (7, 3, False)]),
    "stacked_linears": (False, [(6, 5, True), (5, 4, True)]),
}


def _model(name: str, dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    flatten, layers = CHAINS[name]
    modules = [nn.Linear(*layer[:2], bias=layer[2]) if isinstance(layer, tuple) else layer() for layer in layers]
    return nn.Sequential(*([nn.Flatten()] if flatten else []), *modules).to(dtype), flatten


def _rows(n: int, flatten: bool, classes: int, dtype, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 3, generator=gen, dtype=dtype) if flatten else torch.randn(n, 6, generator=gen, dtype=dtype)
    return x * 2, torch.randint(0, classes, (n,), generator=gen)


def _op_args(model, x, y, split):
    """(out, x, y, weights, biases, layers, split) of the model's chain."""
    linears = [m for m in model if type(m) is nn.Linear]
    layers = [chain_format.LINEAR if type(m) is nn.Linear else CODES[type(m)] for m in model if type(m) is not nn.Flatten]
    size = sum(p.numel() for p in model.parameters())
    out = [torch.full((size,), float("nan"), dtype=x.dtype) for _ in range(1 if split == -1 else 2)]
    return (out, x, y, [m.weight.detach() for m in linears],
            [None if m.bias is None else m.bias.detach() for m in linears], layers, split)


def _autograd(model, x, y):
    """The summed cross-entropy gradient by autograd, flat in parameter order."""
    loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(CHAINS))
def test_the_chain_op_gives_autograds_gradient(name, dtype, backend):
    model, flatten = _model(name, dtype)
    classes = [m for m in model if type(m) is nn.Linear][-1].out_features
    x, y = _rows(9, flatten, classes, dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    with served_by(backend):
        for split in (-1, 0, 4, 9):
            args = _op_args(model, x, y, split)
            OPS.layer_chain_grad_sums_(*args)
            if split == -1:
                torch.testing.assert_close(args[0][0], _autograd(model, x, y), **tol)
            else:
                torch.testing.assert_close(args[0][0], _autograd(model, x[:split], y[:split]), **tol)
                torch.testing.assert_close(args[0][1], _autograd(model, x[split:], y[split:]), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(CHAINS))
def test_the_compiled_chain_op_is_the_reference_bit_for_bit(name, dtype):
    """The CPU kernel against the reference (mini/layer_chain.py's former Python arithmetic)."""
    if not ue.compiled():
        pytest.skip("compiled extension not loaded")
    model, flatten = _model(name, dtype, seed=3)
    classes = [m for m in model if type(m) is nn.Linear][-1].out_features
    x, y = _rows(13, flatten, classes, dtype, seed=4)
    for split in (-1, 5):
        got, want = _op_args(model, x, y, split), _op_args(model, x, y, split)
        OPS.layer_chain_grad_sums_(*got)
        ue.reference.layer_chain_grad_sums_(*want)
        for a, b in zip(got[0], want[0]):
            assert torch.equal(a, b), (split, float((a - b).abs().max()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("target", [-1, 4])
def test_the_chain_op_refuses_an_out_of_range_target_before_any_work(target, backend):
    model, _ = _model("tanh_mlp", torch.float32)
    x, y = _rows(5, False, 4, torch.float32)
    y[3] = target
    args = _op_args(model, x, y, -1)
    with served_by(backend), pytest.raises(RuntimeError, match=rf"y must hold class indices in \[0, 4\), got {target}"):
        OPS.layer_chain_grad_sums_(*args)
    assert args[0][0].isnan().all()  # untouched


def _step_args(d=23, m=2, momentum=0.0, predicted=False, removed=True, start=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    v = lambda dtype=torch.float32: torch.randn(d, generator=gen, dtype=dtype)  # noqa: E731
    W = torch.randn(d, 2 * m, generator=gen, dtype=torch.float64)
    P = torch.randn(2 * m, d, generator=gen, dtype=torch.float64) * 0.1
    return [v(), v() if momentum else None, v() * 0.01, v() * 0.003, W, P, 0.8,
            v(torch.float64) if predicted else None, v() if removed else None, -0.125, 1.14, 1e-3, 0.07, momentum,
            False, start]


VARIANTS = {
    "plain": {}, "predicted": {"predicted": True}, "no_removed": {"removed": False},
    "heavy_ball": {"momentum": 0.9}, "heavy_ball_start": {"momentum": 0.9, "start": True},
    "nesterov": {"momentum": 0.8, "nesterov": True},
}


def _variant(name, **extra):
    options = dict(VARIANTS[name])
    nesterov = options.pop("nesterov", False)
    args = _step_args(**options, **extra)
    args[14] = nesterov
    return args


def _clone(args):
    return [a.clone() if isinstance(a, torch.Tensor) else a for a in args]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_the_compiled_step_op_is_the_reference_bit_for_bit(name):
    if not ue.compiled():
        pytest.skip("compiled extension not loaded")
    args = _variant(name)
    got, want = _clone(args), _clone(args)
    total = OPS.deltagrad_qn_step_(*got)
    expected = ue.reference.deltagrad_qn_step_(*want)
    assert torch.equal(got[0], want[0])
    if got[1] is not None:
        assert torch.equal(got[1], want[1])
    assert torch.equal(total, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_the_step_op_is_its_formula(name, backend):
    """The update in float64 from the schema's formula (B dw = sigma dw - W (P dw)), against the op
    (float32 arithmetic: a few roundings apart)."""
    args = _variant(name)
    w, buffer, dw, recorded, W, P, sigma, predicted, g_removed, alpha, scale, wd, lr, mu, nesterov, start = \
        [a.double() if isinstance(a, torch.Tensor) else a for a in args]
    b_dw = predicted if predicted is not None else sigma * dw - W @ (P @ dw)
    direction = scale * b_dw + (alpha * g_removed if g_removed is not None else 0) + wd * w
    if buffer is None:
        want_w, want_buffer = w - lr * direction + recorded, None
    else:
        direction = direction + recorded
        want_buffer = direction if start else mu * buffer + direction
        want_w = w - lr * (direction + mu * want_buffer if nesterov else want_buffer)
    with served_by(backend):
        total = OPS.deltagrad_qn_step_(*args)
    torch.testing.assert_close(args[0].double(), want_w, rtol=1e-5, atol=1e-6)
    if buffer is not None:
        torch.testing.assert_close(args[1].double(), want_buffer, rtol=1e-5, atol=1e-6)
    assert total.dtype == torch.float64 and float(total) == float(args[0].sum(dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_step_op_reports_a_non_finite_step_in_its_sum(backend):
    args = _variant("plain")
    args[3][5] = float("inf")  # the recorded gradient's term
    with served_by(backend):
        total = OPS.deltagrad_qn_step_(*args)
    assert not torch.isfinite(total) and not torch.isfinite(args[0][5])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_call_mixing_cpu_and_meta_tensors_is_refused_not_faked(backend):
    """Meta wins the dispatch: such a call reached the fake, which did nothing, and the CPU outputs
    were left as they were without an error."""
    model, _ = _model("tanh_mlp", torch.float32)
    x, y = _rows(5, False, 4, torch.float32)
    args = list(_op_args(model, x, y, -1))
    args[1] = x.to("meta")
    with served_by(backend), pytest.raises(RuntimeError, match="y is on cpu but x is on meta"):
        OPS.layer_chain_grad_sums_(*args)
    assert args[0][0].isnan().all()
    step = _variant("heavy_ball")
    step[2] = step[2].to("meta")
    w, buffer = step[0].clone(), step[1].clone()
    with served_by(backend), pytest.raises(RuntimeError, match="dw is on meta but w is on cpu"):
        OPS.deltagrad_qn_step_(*step)
    assert torch.equal(step[0], w) and torch.equal(step[1], buffer)


# ---- deltagrad_qn_run_: a run of quasi-Newton steps ---------------------------------------------------

RUN_SHAPES, RUN_LAYERS = [8, 6, 1, 4, 8, 0], [0, 1, 0]  # Linear(6, 8) -> tanh -> Linear(8, 4, bias=False)
RUN_D = 8 * 6 + 8 + 4 * 8


def _run_args(counts=(3, 0, 2, 5), momentum=0.0, nesterov=False, start=False, seed=0):
    """deltagrad_qn_run_'s arguments: a run of len(counts) steps of batches of 16 with counts[i]
    removed rows, on the chain RUN_SHAPES (d = RUN_D), two pairs (W, P: d x 4 and 4 x d)."""
    gen = torch.Generator().manual_seed(seed)
    v = lambda scale=1.0: torch.randn(RUN_D, generator=gen) * scale  # noqa: E731
    w = v(0.3)
    xs = [torch.randn(c, 6, generator=gen) * 2 for c in counts if c]
    ys = [torch.randint(0, 4, (c,), generator=gen) for c in counts if c]
    W = torch.randn(RUN_D, 4, generator=gen, dtype=torch.float64)
    P = torch.randn(4, RUN_D, generator=gen, dtype=torch.float64) * 0.01
    return [w, v() if momentum else None, torch.zeros(RUN_D), torch.zeros(RUN_D), [w + v(0.01) for _ in counts],
            [v(0.1) for _ in counts], xs, ys, list(counts), [0.1 - 0.01 * i for i in range(len(counts))],
            [16 / (16 - c) for c in counts], [-c / (16 - c) for c in counts], RUN_SHAPES, RUN_LAYERS, W, P, 0.8, 1e-3,
            momentum, nesterov, start]


RUN_VARIANTS = {"plain": {}, "heavy_ball": {"momentum": 0.9}, "heavy_ball_start": {"momentum": 0.9, "start": True},
                "nesterov": {"momentum": 0.8, "nesterov": True}, "no_rows": {"counts": (0, 0)}}


def _clone_run(args):
    return [a.clone() if isinstance(a, torch.Tensor) else [t.clone() for t in a] if isinstance(a, list) and a
            and isinstance(a[0], torch.Tensor) else a for a in args]


def _steps_in_turn(w, buffer, chain_weights, grad, recorded_w, recorded_g, x, y, counts, lrs, scales, removed_alphas,
                   shapes, layers, W, P, sigma, weight_decay, momentum, nesterov, start_buffer):
    """The run as the replay's per-step path takes it, with the two per-step ops: the removed rows'
    gradient through the chain's views of the working copy's buffer, their mean, the recorded
    gradient's term, the step."""
    views, at = [], 0
    for out, inp, bias in zip(shapes[0::3], shapes[1::3], shapes[2::3]):
        views.append((chain_weights[at:at + out * inp].view(out, inp), chain_weights[at + out * inp:at + out * inp + out]
                      if bias else None))
        at += out * inp + (out if bias else 0)
    rows, sums = iter(zip(x, y)), []
    for i, count in enumerate(counts):
        dw = w - recorded_w[i]
        g_removed = None
        if count:
            chain_weights.copy_(w)
            OPS.layer_chain_grad_sums_([grad], *next(rows), [a for a, _ in views], [b for _, b in views], layers, -1)
            g_removed = grad / count
        term = recorded_g[i] * (scales[i] if buffer is not None else -lrs[i] * scales[i])
        sums.append(OPS.deltagrad_qn_step_(w, buffer, dw, term, W, P, sigma, None, g_removed, removed_alphas[i],
                                           scales[i], weight_decay, lrs[i], momentum, nesterov, start_buffer and i == 0))
    return torch.stack(sums)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(RUN_VARIANTS))
def test_a_run_is_the_per_step_ops_in_turn_bit_for_bit(name, backend):
    """What the replay relies on: a run in one call leaves the weights, the momentum buffer and each
    step's sum exactly where the per-step calls leave them."""
    args = _run_args(**RUN_VARIANTS[name])
    got, want = _clone_run(args), _clone_run(args)
    with served_by(backend):
        sums = OPS.deltagrad_qn_run_(*got)
        expected = _steps_in_turn(*want)
    assert torch.equal(got[0], want[0])
    if got[1] is not None:
        assert torch.equal(got[1], want[1])
    assert sums.dtype == torch.float64 and torch.equal(sums, expected)
    assert not torch.equal(got[0], args[0])  # the steps moved the weights


@pytest.mark.parametrize("name", list(RUN_VARIANTS))
def test_the_compiled_run_op_is_the_reference_bit_for_bit(name):
    if not ue.compiled():
        pytest.skip("compiled extension not loaded")
    args = _run_args(**RUN_VARIANTS[name], seed=5)
    got, want = _clone_run(args), _clone_run(args)
    sums = OPS.deltagrad_qn_run_(*got)
    expected = ue.reference.deltagrad_qn_run_(*want)
    for a, b in zip(got[:4], want[:4]):
        assert (a is None and b is None) or torch.equal(a, b)
    assert torch.equal(sums, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_run_stops_after_its_first_non_finite_step(backend):
    args = _run_args()
    args[5][1][7] = float("inf")  # step 1's recorded gradient
    with served_by(backend):
        sums = OPS.deltagrad_qn_run_(*args)
    assert bool(torch.isfinite(sums[0])) and not bool(torch.isfinite(sums[1])) and bool(sums[2:].isnan().all())
    assert float(sums[1]) == float(args[0].sum(dtype=torch.float64)) or bool(sums[1].isnan())  # w as step 1 left it


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_run_refuses_a_bad_row_before_any_work(backend):
    args = _run_args()
    args[7][2][1] = 4  # the third step with rows (step 3): a target out of range
    w, buffer = args[0].clone(), args[2].clone()
    with served_by(backend), pytest.raises(RuntimeError, match=r"y\[2\] must hold class indices in \[0, 4\), got 4"):
        OPS.deltagrad_qn_run_(*args)
    assert torch.equal(args[0], w) and torch.equal(args[2], buffer)
