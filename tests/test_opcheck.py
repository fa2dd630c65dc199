"""Every registered op passes torch.library.opcheck and traces under torch.compile (docs/design.md §2),
served by the compiled kernels and by the reference kernels alike (`backend`: conftest.served_by).

* OP_CASES: one table, a row per (op, inputs) with small odd-sized lists, fp32 and fp16/bf16,
  non-contiguous tensors and empty lists; each row runs opcheck on every device and backend
  (schema, autograd registration, fake tensor, aot_dispatch).
* test_every_registered_op_has_a_row enumerates the dispatcher's registry, so a new op without a
  row (or a row left behind by a removed op) fails.
* One bad-input table: every backend and the fakes refuse each row with a RuntimeError and the same
  message, before any work; the ops and the fakes agree on empty lists.
* One torch.compile(fullgraph=True) test per op family and backend, bit for bit against eager.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_map_only

import unlearn_ext as ue
from unlearn_ext import ops as _ops

from conftest import BACKENDS, LAYOUTS, devices, make_list, make_params, served_by

OPS = torch.ops.unlearn_ext
ALL_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")

SIZES = [37, 1, 255, 6]  # odd sizes; with LAYOUTS: contiguous, transposed (6 -> 3x2 view), strided


# ---- input builders (device -> arguments) -------------------------------------------------------

def _index(device):
    # A transposed 2-D view (non-contiguous) of large and negative indices: the subsequence is the
    # index read as unsigned 64-bit.
    idx = torch.arange(-7, 8, dtype=torch.int64).reshape(3, 5) * (1 << 33) + 12345
    return idx.to(device).t()


def _table(n, device):
    return ue.radius_table(n, 1e-3, device)


def _grads(dtype, device, seed=0, sizes=SIZES):
    return make_list(sizes, LAYOUTS, dtype, device, seed=seed)


def _params(grads):
    return make_params(grads, seed=11)[0]  # plain, permuted and strided views, like the gradients


def _votes(grads, dtype=torch.int16):
    return [torch.zeros((2, *g.shape), dtype=dtype, device=g.device) for g in grads]


def _vote_counts(grads, total, dtype, seed):
    """Counters (2, *shape) holding neg, pos with neg + pos <= total, as `total` samples leave them."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for g in grads:
        neg = torch.randint(0, total + 1, g.shape, generator=gen)
        pos = (torch.rand(g.shape, generator=gen) * (total + 1 - neg)).long()
        out.append(torch.stack([neg, pos]).to(dtype=dtype, device=g.device))
    return out


def _radii_for(values):
    # Radii of the analytic quantizer at beta = 0.1: many entries near the 0.05 threshold.
    return [(v.float().abs() - 0.1).abs().contiguous() for v in values]


def _coded(x, bits, block, levels="linear"):
    return OPS.blockwise_quantize(x, bits, block, levels)


def _ternary(params, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(-1, 2, p.shape, generator=gen, dtype=torch.int8).to(p.device) for p in params]


# ---- the table ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OpCase:
    op: str                          # name in torch.ops.unlearn_ext
    id: str                          # what the row exercises
    args: Callable[[str], tuple]     # device -> the op's arguments
    test_utils: tuple = ALL_UTILS    # narrowed only with a reason at the row


def _rng_cases():
    seed, offset = -(1 << 40) - 3, 17  # a negative int64 seed: its unsigned view keys the generator
    return [
        OpCase("philox_bits", "noncontig", lambda d: (_index(d), 7, seed, offset)),
        OpCase("philox_bits", "empty_index", lambda d: (torch.empty(0, 3, dtype=torch.int64, device=d), 5, 1, 0)),
        OpCase("philox_bits", "zero_draws", lambda d: (_index(d), 0, 1, 0)),
        OpCase("philox_uniform", "noncontig", lambda d: (_index(d), 9, seed, offset)),
        OpCase("philox_bernoulli", "noncontig", lambda d: (_index(d), 6, 0.3, seed, offset)),
    ]


def _smoothing_cases():
    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        tag = str(dtype).removeprefix("torch.")
        mc = (0.2, 0.3, 4, 8)  # tau, sigma, n0, n
        cases += [
            OpCase("quantize_analytic", tag, lambda d, t=dtype: (_grads(t, d), 0.2, 0.05)),
            OpCase("quantize_mc", tag, lambda d, t=dtype: (_grads(t, d), *mc, _table(8, d), 99, 3, 0.05)),
            OpCase("quantized_step_analytic_", tag, lambda d, t=dtype: (
                _params(g := _grads(t, d)), g, 0.2, 0.01, 0.05, True)),
            OpCase("quantized_step_mc_", tag, lambda d, t=dtype: (
                _params(g := _grads(t, d)), g, *mc, _table(8, d), 99, 3, 0.01, 0.05, True)),
            OpCase("vote_accumulate_", tag, lambda d, t=dtype: (
                _votes(g := _grads(t, d), torch.int16 if t == torch.float32 else torch.int32), g, 0.2)),
        ]
    cases += [
        # vote_finalize takes counters, not floats: the dtype axis is int16/int32 (mixed is allowed).
        OpCase("vote_finalize", "int16", lambda d: (
            _vote_counts(g := _grads(torch.float32, d), 4, torch.int16, 1),
            _vote_counts(g, 8, torch.int16, 2), 4, 8, _table(8, d), 0.3, 0.05)),
        OpCase("vote_finalize", "int32_int16", lambda d: (
            _vote_counts(g := _grads(torch.float32, d), 4, torch.int32, 3),
            _vote_counts(g, 8, torch.int16, 4), 4, 8, _table(8, d), 0.3, 0.05)),
        # The only smoothing op that takes an empty list through the dispatcher (radius_table
        # carries the device); the others are covered by test_empty_lists_* below.
        OpCase("quantize_mc", "empty", lambda d: ([], 0.2, 0.3, 4, 8, _table(8, d), 1, 0, 0.05)),
        # Non-finite gradients: the step applies nothing and counts them (check_finite).
        OpCase("quantized_step_analytic_", "nonfinite", lambda d: (
            _params(g := [torch.tensor([1.0, float("nan"), -0.5], device=d)]), g, 0.2, 0.01, 0.0, True)),
    ]
    return cases


def _fragile_cases():
    # fragile_compact's output size is data-dependent (the fake returns an unbacked size); every util
    # still applies: aot_dispatch_dynamic traces it with that unbacked size and compares results.
    def args(dtype, layouts, seed):
        def build(d):
            values = make_list([33, 1025, 6], layouts, dtype, d, seed=seed)
            return values, _radii_for(values), 0.05
        return build
    return [
        OpCase("fragile_compact", "float32", args(torch.float32, ("contiguous", "strided"), 1)),
        OpCase("fragile_compact", "bfloat16", args(torch.bfloat16, LAYOUTS, 2)),
        OpCase("fragile_compact", "float16", args(torch.float16, LAYOUTS, 3)),
        OpCase("fragile_compact", "none_fragile", lambda d: (
            (v := make_list([5, 7], LAYOUTS, torch.float32, d)), [torch.ones_like(x, dtype=torch.float32) for x in v],
            0.05)),
    ]


def _codec_cases():
    cases = []
    sizes = [300, 63, 6, 1]  # a full and a short block, tiny tensors; with LAYOUTS non-contiguous
    # (bits, levels): the linear codes, the normal-quantile 4-bit and the companded 8-bit codebooks.
    for bits, lv in ((8, "linear"), (4, "linear"), (4, "normal"), (8, "companded")):
        for dtype, block in ((torch.float32, 64), (torch.bfloat16, 130), (torch.float16, 64)):
            name = f"int{bits}" if lv == "linear" else f"{lv}{bits}"
            tag = f"{name}_{str(dtype).removeprefix('torch.')}_b{block}"
            x = lambda d, t=dtype: make_list(sizes, LAYOUTS, t, d, seed=7)  # noqa: E731
            cases += [
                OpCase("blockwise_quantize", tag, lambda d, x=x, b=bits, k=block, v=lv: (x(d), b, k, v)),
                OpCase("blockwise_dequantize_", tag, lambda d, x=x, b=bits, k=block, v=lv: (
                    [torch.zeros_like(t) for t in x(d)], *_coded(x(d), b, k, v), b, k, v)),
                OpCase("delta_encode_", tag, lambda d, x=x, b=bits, k=block, v=lv: (
                    x(d), make_list(sizes, LAYOUTS, torch.float32, d, seed=8, scale=0.1),
                    *[[torch.zeros_like(c) for c in part] for part in _ops.empty_codes(x(d), b, k)], b, k, v)),
                OpCase("dequantize_axpy_", tag, lambda d, x=x, b=bits, k=block, v=lv: (
                    make_list(sizes, LAYOUTS, x(d)[0].dtype, d, seed=9), 0.5, *_coded(x(d), b, k, v), b, k, v)),
                OpCase("dequantize_dot", tag, lambda d, x=x, b=bits, k=block, v=lv: (
                    *_coded(x(d), b, k, v), make_list(sizes, LAYOUTS, x(d)[0].dtype, d, seed=9), b, k, v)),
            ]
    # Empty lists: no tensor to dispatch on, served by the CompositeExplicitAutograd kernels.
    cases += [
        OpCase("blockwise_quantize", "empty", lambda d: ([], 8, 64)),
        OpCase("blockwise_dequantize_", "empty", lambda d: ([], [], [], 4, 64)),
        OpCase("delta_encode_", "empty", lambda d: ([], [], [], [], 8, 128)),
        OpCase("dequantize_axpy_", "empty", lambda d: ([], 0.5, [], [], 8, 64)),
        OpCase("dequantize_dot", "empty", lambda d: ([], [], [], 4, 64)),
        OpCase("blockwise_quantize", "empty_normal4", lambda d: ([], 4, 64, "normal")),
        OpCase("delta_encode_", "empty_companded8", lambda d: ([], [], [], [], 8, 128, "companded")),
    ]
    return cases


def _apply_codes_cases():
    return [
        OpCase("apply_codes_", str(dtype).removeprefix("torch."), lambda d, t=dtype: (
            (p := _params(_grads(t, d))), _ternary(p), 0.01))
        for dtype in (torch.float32, torch.bfloat16)
    ]


# The rows above pass no input that requires grad, so opcheck skips test_autograd_registration for
# them. These rows give read-only float inputs requires_grad=True so that check runs (it passes:
# every op has an Autograd-key kernel, csrc/ops.cpp). No op has a derivative: its float outputs and
# the float lists it mutates get a NotImplemented gradient function, so a backward through them
# raises (test_autograd.py). test_aot_dispatch_dynamic's gradient pass is such a backward and
# raises in eager mode, so the rows whose op returns a float skip it (opcheck has no "expect the
# backward to raise" mode; besides, its output sum starts from an integer output where there is
# one and then fails adding a float to it). Rows whose op returns no float (the mutating codec
# ops, vote_accumulate_) run every util: aot_dispatch then compares forward results only.
NO_GRAD_FORMULA = ("test_schema", "test_autograd_registration", "test_faketensor")


def _leaves(tensors):
    return [t.detach().requires_grad_() for t in tensors]


def _zeros(tensors):
    return [torch.zeros_like(t) for t in tensors]


def _requires_grad_cases():
    f32 = torch.float32
    return [
        OpCase("quantize_analytic", "requires_grad", lambda d: (_leaves(_grads(f32, d)), 0.2, 0.05),
               NO_GRAD_FORMULA),
        OpCase("quantized_step_analytic_", "requires_grad", lambda d: (
            _params(g := _grads(f32, d)), _leaves(g), 0.2, 0.01, 0.05, True), NO_GRAD_FORMULA),
        OpCase("vote_accumulate_", "requires_grad", lambda d: (_votes(g := _grads(f32, d)), _leaves(g), 0.2)),
        OpCase("blockwise_dequantize_", "requires_grad", lambda d: (
            _zeros(g := _grads(f32, d)), (q := _coded(g, 8, 64))[0], _leaves(q[1]), 8, 64)),
        OpCase("dequantize_axpy_", "requires_grad", lambda d: (
            _grads(f32, d, seed=3), 0.5, (q := _coded(_grads(f32, d), 4, 64))[0], _leaves(q[1]), 4, 64)),
        OpCase("delta_encode_", "requires_grad", lambda d: (
            _leaves(g := _grads(f32, d)), _zeros(g), *map(_zeros, _ops.empty_codes(g, 8, 64)), 8, 64)),
        OpCase("fragile_compact", "requires_grad", lambda d: (
            _leaves(v := _grads(f32, d)), _radii_for(v), 0.05), NO_GRAD_FORMULA),
        OpCase("blockwise_quantize", "requires_grad", lambda d: (_leaves(_grads(f32, d)), 8, 64),
               NO_GRAD_FORMULA),
        OpCase("dequantize_dot", "requires_grad", lambda d: (
            *_coded(g := _grads(f32, d), 4, 64), _leaves(g), 4, 64), NO_GRAD_FORMULA),
    ]


def _select_cases():
    """Selection ops: fp32/fp16/bf16 scores in non-contiguous lists, key modes value/abs/random,
    every apply action, masks emitted or not, a list with an empty tensor."""
    sizes = [37, 1, 255, 6]
    key0 = 0x80000000  # the key of 0.0
    cases = [OpCase("select_histogram", "empty_tensor", lambda d: (
        [torch.zeros(0, device=d), torch.randn(9, device=d)], 1, 0, 0, 0, 0, 0, 8))]
    for dtype, mode in ((torch.float32, 1), (torch.float16, 0), (torch.bfloat16, 2)):
        tag = f"{str(dtype).removeprefix('torch.')}_mode{mode}"
        sc = lambda d, t=dtype: make_list(sizes, LAYOUTS, t, d, seed=3)  # noqa: E731
        cases += [
            OpCase("select_histogram", tag, lambda d, sc=sc, m=mode: (sc(d), m, 5, 1, 0, 0, 0, 16)),
            OpCase("select_histogram", tag + "_prefix", lambda d, sc=sc, m=mode: (sc(d), m, 5, 1, 7, 0x801, 12, 12)),
            OpCase("select_tie_boundary", tag, lambda d, sc=sc, m=mode: (
                [(x * 0).to(x.dtype) for x in sc(d)], m, 5, 1, 3, key0, 50)),
        ]
    for action, alpha, src in ((0, 0.0, False), (0, 0.0, True), (1, 0.1, False), (2, 0.05, False), (3, -0.2, True)):
        for dtype in (torch.float32, torch.bfloat16):
            tag = f"act{action}_{str(dtype).removeprefix('torch.')}{'_src' if src else ''}"
            cases.append(OpCase("select_apply_", tag, lambda d, t=dtype, a=action, al=alpha, s=src: (
                _params(g := _grads(t, d)), make_list(sizes, LAYOUTS, torch.float16, d, seed=4),
                _params(_grads(t, d, seed=6)) if s else [],
                [torch.zeros(x.shape, dtype=torch.bool, device=d) for x in g] if a != 1 else [],
                1, 0, 0, 0, 0xBE000000, 100, a, al, 9, 2)))
    cases += [
        OpCase("select_apply_", "random_shapes_only", lambda d: (
            _params(_grads(torch.float32, d)), [], [], [], 2, 3, 4, 0, 0xC0000000, 0, 1, 0.5, 0, 0)),
        OpCase("select_mask_grad_", "float32", lambda d: (
            _params(_grads(torch.float32, d)), _grads(torch.float32, d, seed=8), 1, 0, 0, 0, 0xBE000000, 100)),
        OpCase("select_mask_grad_", "bf16_random", lambda d: (
            _params(_grads(torch.bfloat16, d)), _grads(torch.bfloat16, d, seed=8), 2, 1, 2, 10, 0xE0000000, 0)),
        OpCase("select_histogram_near", "float32", lambda d: (
            make_list(sizes, LAYOUTS, torch.float32, d, seed=3), 1, 0, 0, 0, 30)),
        OpCase("select_histogram_near", "bf16_random", lambda d: (
            make_list(sizes, LAYOUTS, torch.bfloat16, d, seed=3), 2, 5, 1, 7, 3)),
        OpCase("select_histogram_near", "sampled", lambda d: (  # above the CPU's sampling size
            [torch.randn(70000, device=d), torch.randn(300, 220, device=d).t()], 0, 0, 0, 0, 1300)),
        OpCase("select_apply_bin_", "random_shapes_only", lambda d: (
            _params(_grads(torch.float32, d)), [], [], [], 2, 3, 4, 0, 0xC, 4, 5, 1, 0.5, 0, 0)),
    ]
    for action, alpha, src in ((0, 0.0, False), (1, 0.1, False), (2, 0.05, False), (3, -0.2, True)):
        for dtype in (torch.float32, torch.float16):
            tag = f"act{action}_{str(dtype).removeprefix('torch.')}{'_src' if src else ''}"
            cases.append(OpCase("select_apply_bin_", tag, lambda d, t=dtype, a=action, al=alpha, s=src: (
                _params(g := _grads(t, d)), make_list(sizes, LAYOUTS, torch.bfloat16, d, seed=4),
                _params(_grads(t, d, seed=6)) if s else [],
                [torch.zeros(x.shape, dtype=torch.bool, device=d) for x in g] if a != 1 else [],
                1, 0, 0, 3, 0xBE, 8, 20, a, al, 9, 2)))
    return cases


def _chain(dtype, device, biases=(True, False), rows=7, split=-1, layers=(0, 1, 0)):
    """layer_chain_grad_sums_'s arguments: a chain 5 -> 4 -> 3 (codes `layers`, two Linears) on
    `rows` rows of x shaped (rows, 5) as a (rows, 1, 5) tensor (flattened by the op)."""
    gen = torch.Generator().manual_seed(2)
    weights = [torch.randn(4, 5, generator=gen, dtype=dtype), torch.randn(3, 4, generator=gen, dtype=dtype)]
    bias = [torch.randn(w.shape[0], generator=gen, dtype=dtype) if b else None for w, b in zip(weights, biases)]
    total = sum(t.numel() for t in weights + bias if t is not None)
    x = torch.randn(rows, 1, 5, generator=gen, dtype=dtype)
    y = torch.randint(0, 3, (rows,), generator=gen)
    out = [torch.zeros(total, dtype=dtype, device=device) for _ in range(1 if split == -1 else 2)]
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return out, x.to(device), y.to(device), [move(w) for w in weights], [move(b) for b in bias], list(layers), split


def _qn_step(device, momentum=0.0, predicted=False, removed=True, start=False):
    """deltagrad_qn_step_'s arguments on d = 11 weights and two pairs (W, P: 11 x 4 and 4 x 11)."""
    gen = torch.Generator().manual_seed(4)
    v = lambda dtype=torch.float32: torch.randn(11, generator=gen, dtype=dtype).to(device)  # noqa: E731
    W, P = torch.randn(11, 4, generator=gen, dtype=torch.float64), torch.randn(4, 11, generator=gen, dtype=torch.float64)
    return (v(), v() if momentum else None, v(), v(), W.to(device), P.to(device), 0.7,
            v(torch.float64) if predicted else None, v() if removed else None, -0.1, 1.1, 1e-3, 0.05, momentum,
            False, start)


def _qn_run(device, momentum=0.0, start=False, counts=(2, 0, 3)):
    """deltagrad_qn_run_'s arguments: len(counts) steps of a 5 -> 4 -> tanh -> 3 chain (biases on the
    first Linear only; d = 36 weights) with counts[i] removed rows, two pairs (W, P: 36 x 4, 4 x 36)."""
    gen = torch.Generator().manual_seed(6)
    d = 4 * 5 + 4 + 3 * 4
    v = lambda scale=1.0: (torch.randn(d, generator=gen) * scale).to(device)  # noqa: E731
    w = v(0.3)
    x = [torch.randn(c, 5, generator=gen).to(device) for c in counts if c]
    y = [torch.randint(0, 3, (c,), generator=gen).to(device) for c in counts if c]
    W, P = torch.randn(d, 4, generator=gen, dtype=torch.float64), torch.randn(4, d, generator=gen, dtype=torch.float64)
    return (w, v() if momentum else None, torch.zeros(d, device=device), torch.zeros(d, device=device),
            [w + v(0.01) for _ in counts], [v(0.1) for _ in counts], x, y, list(counts),
            [0.05 * (1 + i) for i in range(len(counts))], [16 / (16 - c) for c in counts],
            [-c / (16 - c) for c in counts], [4, 5, 1, 3, 4, 0], [0, 1, 0], W.to(device), P.to(device) * 0.01, 0.7,
            1e-3, momentum, False, start)


def _replay_cases():
    cases = []
    for dtype in (torch.float32, torch.float64):
        tag = str(dtype).removeprefix("torch.")
        cases += [
            OpCase("layer_chain_grad_sums_", tag, lambda d, t=dtype: _chain(t, d)),
            OpCase("layer_chain_grad_sums_", tag + "_split", lambda d, t=dtype: _chain(t, d, split=3)),
            OpCase("layer_chain_grad_sums_", tag + "_relu_sigmoid", lambda d, t=dtype: _chain(
                t, d, biases=(False, True), layers=(0, 3, 2, 0))),
        ]
    cases += [
        OpCase("deltagrad_qn_step_", "plain", lambda d: _qn_step(d)),
        OpCase("deltagrad_qn_step_", "predicted_no_removed", lambda d: _qn_step(d, predicted=True, removed=False)),
        OpCase("deltagrad_qn_step_", "momentum", lambda d: _qn_step(d, momentum=0.9)),
        OpCase("deltagrad_qn_step_", "momentum_start", lambda d: _qn_step(d, momentum=0.9, start=True)),
        OpCase("deltagrad_qn_run_", "plain", lambda d: _qn_run(d)),
        OpCase("deltagrad_qn_run_", "momentum_start", lambda d: _qn_run(d, momentum=0.9, start=True)),
        OpCase("deltagrad_qn_run_", "no_rows", lambda d: _qn_run(d, momentum=0.9, counts=(0,))),
    ]
    return cases


OP_CASES = (_rng_cases() + _smoothing_cases() + _fragile_cases() + _codec_cases() + _apply_codes_cases()
            + _requires_grad_cases() + _select_cases() + _replay_cases())


def registered_ops() -> set[str]:
    """Names of the unlearn_ext ops in the dispatcher's registry (overload names stripped)."""
    prefix = "unlearn_ext::"
    return {name[len(prefix):].split(".")[0] for name in torch._C._dispatch_get_all_op_names()
            if name.startswith(prefix)}


def _op(name: str):
    return getattr(OPS, name)


# ---- opcheck ----------------------------------------------------------------------------------------

@pytest.fixture(params=BACKENDS)
def backend(request):
    """Which kernels serve the ops in the test: the compiled ones or the reference (conftest)."""
    with served_by(request.param):
        yield request.param


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", OP_CASES, ids=lambda c: f"{c.op}-{c.id}")
def test_opcheck(case, device, backend):
    op = _op(case.op)
    torch.library.opcheck(op, case.args(device), test_utils=case.test_utils)


def test_every_registered_op_has_a_row():
    rows = {c.op for c in OP_CASES}
    registered = registered_ops()
    assert registered, "no unlearn_ext op is registered"
    missing = sorted(registered - rows)
    assert not missing, f"ops without an OP_CASES row (add one to tests/test_opcheck.py): {missing}"
    stale = sorted(rows - registered)
    assert not stale, f"OP_CASES rows whose op is not registered: {stale}"


# ---- fakes: input checks and empty lists ------------------------------------------------------------

def _on_fakes(op, args):
    """Calls op's fake implementation on fake copies of args (no kernel runs)."""
    mode = FakeTensorMode()
    fake_args = tree_map_only(torch.Tensor, mode.from_tensor, args)
    with mode:
        return op(*fake_args)


def _g(n=5):
    return [torch.randn(n), torch.randn(2, 3)]


def _q(bits=8, block=64):
    return OPS.blockwise_quantize(_g(), bits, block)


OVERLAP = "writes a tensor whose elements share memory"


def _overlap():
    """Like _g(), but the first tensor's 5 elements are one (an as_strided view with stride 0)."""
    return [torch.zeros(3).as_strided((5,), (0,)), torch.zeros(2, 3)]


def tree_leaves_tensors(args):
    return [t for t in torch.utils._pytree.tree_leaves(args) if isinstance(t, torch.Tensor)]


def _bad_inputs():
    """(op, id, arguments, message every backend and the fake must give, as a RuntimeError)."""
    ints = lambda *shapes, dtype=torch.int8: [torch.zeros(s, dtype=dtype) for s in shapes]  # noqa: E731
    return [
        ("philox_bits", "index_dtype", (torch.arange(4, dtype=torch.int32), 2, 0, 0), "element_index must be int64"),
        ("philox_uniform", "draws", (torch.arange(4), -1, 0, 0), r"draws must be in \[0, 65536\]"),
        # A huge draws is refused before the (tens of GB) output is allocated.
        ("philox_bits", "draws_huge", (torch.arange(4), 2**31, 0, 0), r"draws must be in \[0, 65536\]"),
        ("philox_uniform", "draws_huge", (torch.arange(4), 2**31, 0, 0), r"draws must be in \[0, 65536\]"),
        ("philox_bernoulli", "draws_huge", (torch.arange(4), 2**31, 0.5, 0, 0), r"draws must be in \[0, 65536\]"),
        # Empty lists reach the op's checks like any other list.
        ("quantize_analytic", "empty_beta", ([], -1.0, 0.0), "beta must be finite and >= 0"),
        ("vote_accumulate_", "empty_tau", ([], [], float("nan")), "tau must be"),
        ("quantized_step_analytic_", "empty", ([], [], 0.1, 0.1, 0.0, True), "the step needs at least one tensor"),
        ("dequantize_dot", "empty_bits", ([], [], [], 3, 64), "bits must be 8"),
        ("select_histogram", "empty_mode", ([], 5, 0, 0, 0, 0, 0, 16), "key mode must be 0"),
        ("select_apply_", "empty_action", ([], [], [], [], 1, 0, 0, 0, 3, 1, 7, 0.5, 0, 0), "action must be 0"),
        # Written tensors whose elements share memory (stride 0) are refused by every in-place op.
        ("quantized_step_analytic_", "overlap", (_overlap(), _g(), 0.1, 0.1, 0.0, True), OVERLAP),
        ("quantized_step_mc_", "overlap", (_overlap(), _g(), 0.1, 0.3, 4, 8, torch.zeros(9), 0, 0, 0.1, 0.0, True),
         OVERLAP),
        ("apply_codes_", "overlap", (_overlap(), ints(5, (2, 3)), 0.1), OVERLAP),
        ("vote_accumulate_", "overlap", ([torch.zeros(1, dtype=torch.int16).expand(2, 5), *ints((2, 2, 3),
                                          dtype=torch.int16)], _g(), 0.1), OVERLAP),
        ("blockwise_dequantize_", "overlap", (_overlap(), *_q(), 8, 64), OVERLAP),
        ("delta_encode_", "overlap_recon", (_g(), _overlap(), *[[torch.zeros_like(c) for c in part] for part in _q()],
                                            8, 64), OVERLAP),
        ("delta_encode_", "overlap_codes", (_g(), [torch.zeros(5), torch.zeros(2, 3)],
                                            [torch.zeros(1, dtype=torch.int8).expand(5), *ints(6)], _q()[1], 8, 64),
         OVERLAP),
        ("dequantize_axpy_", "overlap", (_overlap(), 0.5, *_q(), 8, 64), OVERLAP),
        ("select_apply_", "overlap", (_overlap(), _g(), [], [], 1, 0, 0, 0, 3, 1, 1, 0.5, 0, 0), OVERLAP),
        ("select_apply_", "overlap_masks", (_g(), _g(), [], [torch.zeros(1, dtype=torch.bool).expand(5),
                                                              *ints((2, 3), dtype=torch.bool)],
                                            1, 0, 0, 0, 3, 1, 0, 0.0, 0, 0), OVERLAP),
        ("select_apply_bin_", "overlap", (_overlap(), _g(), [], [], 1, 0, 0, 0, 0, 8, 1, 1, 0.5, 0, 0), OVERLAP),
        ("select_mask_grad_", "overlap", (_overlap(), _g(), 1, 0, 0, 0, 3, 1), OVERLAP),
        ("philox_bernoulli", "p", (torch.arange(4), 2, 1.5, 0, 0), r"p must be in \[0, 1\]"),
        ("quantize_analytic", "int_grads", ([torch.arange(4)], 0.1, 0.0), "expected float32, float16 or bfloat16"),
        ("quantize_analytic", "mixed_dtypes", ([torch.randn(4), torch.randn(4).half()], 0.1, 0.0), "share one dtype"),
        ("quantize_analytic", "beta", (_g(), -1.0, 0.0), "beta must be finite and >= 0"),
        ("quantize_mc", "table_size", (_g(), 0.1, 0.3, 4, 8, torch.zeros(8), 0, 0, 0.0), "radius_table must be a 1-D"),
        ("quantize_mc", "sigma", (_g(), 0.1, 0.0, 4, 8, torch.zeros(9), 0, 0, 0.0), "sigma must be a finite"),
        ("quantize_mc", "tau", (_g(), float("inf"), 0.3, 4, 8, torch.zeros(9), 0, 0, 0.0), "tau must be"),
        ("quantized_step_analytic_", "lengths", ([torch.randn(5)], _g(), 0.1, 0.1, 0.0, True),
         "params has 1 tensors but grads has 2"),
        ("quantized_step_analytic_", "shapes", ([torch.randn(5), torch.randn(3, 2)], _g(), 0.1, 0.1, 0.0, True),
         r"params\[1\] has shape"),
        ("quantized_step_mc_", "dtypes", ([torch.randn(5).double(), torch.randn(2, 3)], _g(), 0.1, 0.3, 4, 8,
                                          torch.zeros(9), 0, 0, 0.1, 0.0, True), r"params\[0\] has dtype"),
        ("quantized_step_mc_", "empty", ([], [], 0.1, 0.3, 4, 8, torch.zeros(9), 0, 0, 0.1, 0.0, True),
         "the step needs at least one tensor"),
        ("vote_accumulate_", "vote_shape", ([torch.zeros(5, dtype=torch.int16),
                                             torch.zeros(2, 2, 3, dtype=torch.int16)],
                                            _g(), 0.1), r"votes\[0\] must have shape \(2, \*grads\[0\]\.shape\)"),
        ("vote_accumulate_", "vote_dtype", ([torch.zeros(2, 5), torch.zeros(2, 2, 3)], _g(), 0.1),
         "must be int16 or int32 counts"),
        ("vote_finalize", "lengths", ([torch.zeros(2, 5, dtype=torch.int16)], [], 4, 8, torch.zeros(9), 0.3, 0.0),
         "selection_votes has 1 tensors but estimation_votes has 0"),
        ("vote_finalize", "empty", ([], [], 4, 8, torch.zeros(9), 0.3, 0.0), "vote_finalize needs at least one tensor"),
        ("fragile_compact", "radii_dtype", ([torch.randn(4)], [torch.zeros(4, dtype=torch.float64)], 0.1),
         r"radii\[0\] must be float32"),
        ("fragile_compact", "lengths", ([torch.randn(4)], [torch.zeros(4), torch.zeros(1)], 0.1),
         "values has 1 tensors but radii has 2"),
        ("blockwise_quantize", "bits", (_g(), 3, 64), "bits must be 8"),
        ("blockwise_quantize", "block_size", (_g(), 8, 65), r"block_size must be an even number in \[64, 4096\]"),
        ("blockwise_quantize", "block_size_large", (_g(), 8, 8192), "block_size must be an even number"),
        ("blockwise_dequantize_", "count", (_g(), _q()[0][:1], _q()[1], 8, 64), "codes has 1 tensors but out has 2"),
        ("blockwise_dequantize_", "code_dtype", (_g(), [c.view(torch.uint8) for c in _q()[0]], _q()[1], 8, 64),
         "8-bit codes are"),
        ("blockwise_dequantize_", "numel", ([torch.randn(4), torch.randn(2, 3)], *_q(), 8, 64),
         r"codes\[0\] has 5 entries but out\[0\] \(4 elements\)"),
        ("delta_encode_", "recon_dtype", (_g(), [torch.zeros(5).half(), torch.zeros(2, 3)], *_q(), 8, 64),
         r"recon\[0\] must be float32"),
        ("delta_encode_", "block_mismatch", ([torch.randn(300)], [torch.zeros(300)],
                                             *OPS.blockwise_quantize([torch.randn(300)], 8, 64), 8, 4096),
         "codes and scales must come from the same block_size"),
        ("dequantize_axpy_", "alpha", (_g(), 1e39, *_q(), 8, 64), "alpha must be finite as float32"),
        ("dequantize_dot", "scales_dtype", (_q()[0], [s.double() for s in _q()[1]], _g(), 8, 64),
         r"scales\[0\] must be float32"),
        ("select_histogram", "key_mode", (_g(), 5, 0, 0, 0, 0, 0, 16), "key mode must be 0"),
        ("select_histogram", "digit_bits", (_g(), 1, 0, 0, 0, 0, 0, 17), r"digit_bits must be in \[1, 16\]"),
        ("select_tie_boundary", "needed", (_g(), 1, 0, 0, 0, 5, -1), "needed must be >= 0"),
        ("select_apply_", "action", (_g(), _g(), [], [], 1, 0, 0, 0, 3, 1, 7, 0.5, 0, 0), "action must be 0"),
        ("select_apply_", "boundary", (_g(), _g(), [], [], 1, 0, 0, 0, 3, -1, 0, 0.5, 0, 0), "boundary must be >= 0"),
        ("select_histogram_near", "k", (_g(), 1, 0, 0, 0, -1), "k must be >= 0"),
        ("select_histogram_near", "base", (_g(), 1, 0, 0, -1, 5), r"base \(the global index"),
        ("select_apply_bin_", "prefix_bits", (_g(), _g(), [], [], 1, 0, 0, 0, 0, 0, 1, 0, 0.5, 0, 0),
         r"prefix_bits must be in \[1, 32\]"),
        ("select_apply_bin_", "alpha", (_g(), _g(), [], [], 1, 0, 0, 0, 0, 8, 1, 1, float("inf"), 0, 0),
         "alpha must be finite"),
        ("select_mask_grad_", "threshold", (_g(), _g(), 1, 0, 0, 0, -2, 0), r"threshold must be in \[-1, 2\^32\]"),
        ("layer_chain_grad_sums_", "x_dtype", _replaced(_chain(torch.float32, "cpu"), 1, lambda x: x.double()),
         "x has dtype"),
        ("layer_chain_grad_sums_", "x_width", _replaced(_chain(torch.float32, "cpu"), 1, lambda x: x[..., :4]),
         "x must have rows of 5 values"),
        ("layer_chain_grad_sums_", "y_dtype", _replaced(_chain(torch.float32, "cpu"), 2, lambda y: y.int()),
         "y must be 1-D int64"),
        ("layer_chain_grad_sums_", "y_rows", _replaced(_chain(torch.float32, "cpu"), 2, lambda y: y[:5]),
         "x has 7 rows but y has 5"),
        ("layer_chain_grad_sums_", "no_rows", _chain(torch.float32, "cpu", rows=0), "x has no rows"),
        ("layer_chain_grad_sums_", "weight_shape", _replaced(_chain(torch.float32, "cpu"), 3, lambda w: [w[0], w[1].t()]),
         r"weights\[1\] must be 2-D with 4 columns"),
        ("layer_chain_grad_sums_", "bias_shape", _replaced(_chain(torch.float32, "cpu"), 4, lambda b: [b[0][:3], None]),
         r"biases\[0\] must have shape \(4,\)"),
        ("layer_chain_grad_sums_", "layer_code", _replaced(_chain(torch.float32, "cpu"), 5, lambda _: [0, 7, 0]),
         r"layers\[1\] must be 0 \(linear\)"),
        ("layer_chain_grad_sums_", "last_layer", _replaced(_chain(torch.float32, "cpu"), 5, lambda _: [0, 0, 1]),
         "the last layer must be linear"),
        ("layer_chain_grad_sums_", "linears", _replaced(_chain(torch.float32, "cpu"), 5, lambda _: [1, 0]),
         "layers name 1 linear layers but weights has 2"),
        ("layer_chain_grad_sums_", "split", _chain(torch.float32, "cpu", split=8), r"split must be -1 \(none\)"),
        ("layer_chain_grad_sums_", "out_count", _replaced(_chain(torch.float32, "cpu", split=2), 0, lambda o: o[:1]),
         "out must hold 2 tensors"),
        ("layer_chain_grad_sums_", "out_size", _replaced(_chain(torch.float32, "cpu"), 0, lambda o: [o[0][:-1]]),
         r"out\[0\] must be a contiguous 1-D tensor of 36 values"),
        ("deltagrad_qn_step_", "w_dtype", _replaced(_qn_step("cpu"), 0, lambda w: w.double()),
         "w must be a 1-D float32 tensor"),
        ("deltagrad_qn_step_", "dw_shape", _replaced(_qn_step("cpu"), 2, lambda v: v[:10]),
         "dw must be a 1-D float32 tensor of 11 values"),
        ("deltagrad_qn_step_", "W_dtype", _replaced(_qn_step("cpu"), 4, lambda W: W.float()),
         "W must be a 2-D float64 tensor with 11 rows"),
        ("deltagrad_qn_step_", "P_shape", _replaced(_qn_step("cpu"), 5, lambda P: P[:3]),
         r"P must be a float64 tensor of shape \(4, 11\)"),
        ("deltagrad_qn_step_", "predicted_dtype", _replaced(_qn_step("cpu", predicted=True), 7, lambda p: p.float()),
         "predicted must be a 1-D float64 tensor"),
        ("deltagrad_qn_step_", "buffer_shape", _replaced(_qn_step("cpu", momentum=0.9), 1, lambda b: b[:3]),
         "buffer must be a 1-D float32 tensor of 11 values"),
        ("deltagrad_qn_step_", "lr", _replaced(_qn_step("cpu"), 12, lambda _: float("nan")), "lr must be finite"),
        ("deltagrad_qn_run_", "w_dtype", _replaced(_qn_run("cpu"), 0, lambda w: w.double()),
         "w must be a 1-D float32 tensor"),
        ("deltagrad_qn_run_", "grad_size", _replaced(_qn_run("cpu"), 3, lambda g: g[:-1]),
         "grad must be a contiguous 1-D float32 tensor of 36 values"),
        ("deltagrad_qn_run_", "lrs_count", _replaced(_qn_run("cpu"), 9, lambda lrs: lrs[:2]),
         "lrs has 2 entries but counts has 3"),
        ("deltagrad_qn_run_", "recorded_g_shape", _replaced(_qn_run("cpu"), 5, lambda g: [g[0], g[1][:5], g[2]]),
         r"recorded_g\[1\] must be a 1-D float32 tensor of 36 values"),
        ("deltagrad_qn_run_", "shapes_count", _replaced(_qn_run("cpu"), 12, lambda s: s[:5]),
         r"shapes must hold \(out, in, bias\) for each of the 2 linear layers"),
        ("deltagrad_qn_run_", "shapes_chain", _replaced(_qn_run("cpu"), 12, lambda _: [4, 5, 1, 3, 2, 0]),
         "linear layer 1 takes 2 values but the layer below gives 4"),
        ("deltagrad_qn_run_", "shapes_total", _replaced(_qn_run("cpu"), 12, lambda _: [4, 5, 1, 3, 4, 1]),
         "the layers hold 39 parameters but w has 36"),
        ("deltagrad_qn_run_", "count", _replaced(_qn_run("cpu"), 8, lambda _: [2, -1, 3]),
         r"counts\[1\] must be >= 0"),
        ("deltagrad_qn_run_", "rows_entries", _replaced(_qn_run("cpu"), 8, lambda _: [2, 1, 3]),
         r"x and y must hold one entry per step with rows \(3\), got 2 and 2"),
        ("deltagrad_qn_run_", "x_rows", _replaced(_qn_run("cpu"), 8, lambda _: [3, 0, 3]),
         r"x\[0\] must be float32 with 3 rows \(counts\[0\]\) of 5 values"),
        ("deltagrad_qn_run_", "y_dtype", _replaced(_qn_run("cpu"), 7, lambda y: [y[0].int(), y[1]]),
         r"y\[0\] must be 1-D int64 class indices"),
        ("deltagrad_qn_run_", "P_shape", _replaced(_qn_run("cpu"), 15, lambda P: P[:3]),
         r"P must be a float64 tensor of shape \(4, 36\)"),
        ("deltagrad_qn_run_", "lr", _replaced(_qn_run("cpu"), 9, lambda lrs: [lrs[0], float("inf"), lrs[2]]),
         "lrs, scales and removed_alphas must be finite"),
    ]


def _replaced(args, i, change):
    """args with argument i replaced by change(argument i)."""
    return (*args[:i], change(args[i]), *args[i + 1:])


@pytest.mark.parametrize("name, args, message", [pytest.param(n, a, m, id=f"{n}-{i}")
                                                 for n, i, a, m in _bad_inputs()])
def test_every_backend_and_the_fake_refuse_bad_inputs_alike(name, args, message, backend):
    op = getattr(OPS, name)
    before = tree_map_only(torch.Tensor, torch.clone, args)
    with pytest.raises(RuntimeError, match=message) as refused:
        op(*args)
    assert refused.type is RuntimeError
    assert_bitwise(list(tree_leaves_tensors(args)), list(tree_leaves_tensors(before)), "arguments after the refusal")
    with pytest.raises(RuntimeError, match=message) as refused:
        _on_fakes(op, args)
    assert refused.type is RuntimeError


def _meta(x):
    """Shape, dtype and device of every tensor in a (nested) result."""
    if isinstance(x, torch.Tensor):
        return tuple(x.shape), x.dtype, x.device.type
    if isinstance(x, (list, tuple)):
        return [_meta(y) for y in x]
    return x


# Calls whose lists are all empty carry no tensor, hence no device key: the ops' default kernel (the
# reference) answers them on every backend, with the op's checks (the refusals are rows of the
# bad-input table), never with the dispatcher's "no tensor arguments" error.
EMPTY_CALLS = [
    ("quantize_analytic", ([], 0.2, 0.05)),
    ("apply_codes_", ([], [], 0.1)),
    ("vote_accumulate_", ([], [], 0.2)),
    ("fragile_compact", ([], [], 0.05)),
    ("blockwise_quantize", ([], 4, 64, "normal")),
    ("blockwise_dequantize_", ([], [], [], 8, 64)),
    ("delta_encode_", ([], [], [], [], 8, 128, "companded")),
    ("dequantize_axpy_", ([], 0.5, [], [], 8, 64)),
    ("dequantize_dot", ([], [], [], 4, 64)),
    ("select_histogram", ([], 1, 0, 0, 0, 0, 0, 8)),
    ("select_tie_boundary", ([], 1, 0, 0, 7, 5, 0)),
    ("select_apply_", ([], [], [], [], 1, 0, 0, 0, 3, 1, 1, 0.5, 0, 0)),
    ("select_histogram_near", ([], 1, 0, 0, 0, 3)),
    ("select_apply_bin_", ([], [], [], [], 1, 0, 0, 0, 0, 8, 1, 1, 0.5, 0, 0)),
    ("select_mask_grad_", ([], [], 1, 0, 0, 0, 3, 1)),
]


def test_every_op_taking_only_lists_has_an_empty_call():
    """Every op without a lone Tensor argument (those always carry a device) has a row above."""
    lists_only = {name for name in registered_ops()
                  if not any(str(a.type) == "Tensor" for a in getattr(OPS, name).default._schema.arguments)}
    assert lists_only == {n for n, _ in EMPTY_CALLS} | {"quantized_step_analytic_"}  # the step refuses


@pytest.mark.parametrize("name, args", EMPTY_CALLS, ids=[n for n, _ in EMPTY_CALLS])
def test_empty_lists_op_fake_and_reference_agree(name, args, backend):
    got = getattr(OPS, name)(*args)
    assert _meta(got) == _meta(_on_fakes(getattr(OPS, name), args))
    want = getattr(ue.reference, name)(*args)  # the pure function, called directly
    if got is None:
        assert want is None
    else:
        assert_bitwise(list(tree_leaves_tensors(got)), list(tree_leaves_tensors(want)))
    # ... and for the analytic quantizer what the kernels give for an empty list (quantize_mc's row).
    if name == "quantize_analytic":
        assert _meta(got) == _meta(OPS.quantize_mc([], 0.2, 0.3, 4, 8, _table(8, "cpu"), 0, 0, 0.05))
        assert got[2].item() == float("inf") and got[3].tolist() == [0, 0, 0]


# ---- torch.compile, one test per family -------------------------------------------------------------
# Backend "aot_eager": it runs dynamo (fullgraph: no graph break allowed), then AOTAutograd with the
# fakes and functionalization of the mutating ops (auto_functionalized), and executes the traced
# graph eagerly; inductor's code generation would add minutes on 2 cores and test nothing of ours.

class _Compiled:
    """fn under torch.compile(fullgraph=True, backend=aot_eager), keeping the traced outputs (fake
    tensors from the fakes): aot_eager runs the real kernels, so comparing results alone would
    not notice a fake that lies about a dtype or a shape; `check_traced` does."""

    def __init__(self, fn):
        self.traced = []
        torch._dynamo.reset()
        self.fn = torch.compile(fn, fullgraph=True, backend=self._backend)

    def _backend(self, gm, example_inputs):
        (outputs,) = next(n for n in gm.graph.nodes if n.op == "output").args
        self.traced.append([n.meta["example_value"] for n in torch.utils._pytree.tree_leaves(outputs)])
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    def __call__(self, *args):
        return self.fn(*args)

    def check_traced(self, eager_result):
        """The one traced graph's outputs have the eager outputs' dtypes and (concrete) shapes."""
        assert len(self.traced) == 1, f"{len(self.traced)} graphs"
        real = [t for t in torch.utils._pytree.tree_leaves(eager_result) if isinstance(t, torch.Tensor)]
        fake = self.traced[0]
        assert len(fake) == len(real)
        for i, (f, r) in enumerate(zip(fake, real)):
            assert f.dtype == r.dtype, f"output {i}: traced {f.dtype}, eager {r.dtype}"
            assert f.dim() == r.dim(), f"output {i}: traced {f.dim()}-D, eager {r.dim()}-D"
            for fd, rd in zip(f.shape, r.shape):  # unbacked sizes (fragile_compact) are symbols
                assert not isinstance(fd, int) or fd == rd, \
                    f"output {i}: traced {tuple(f.shape)}, eager {tuple(r.shape)}"


def _compiled(fn):
    return _Compiled(fn)


def _clone(tensors):
    return [t.clone() for t in tensors]


def _bits(t):
    """The bytes of a tensor: compares bit for bit (NaN payloads, signed zeros)."""
    return t.reshape(-1).clone(memory_format=torch.contiguous_format).view(torch.uint8)


def assert_bitwise(a, b, what="result"):
    if isinstance(a, torch.Tensor):
        assert (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device), what
        assert torch.equal(_bits(a), _bits(b)), f"{what}: values differ"
    else:
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise(x, y, f"{what}[{i}]")


@pytest.mark.parametrize("device", devices())
def test_compile_rng(device, backend):
    def fn(index):
        return (OPS.philox_bits(index, 7, -3, 11), OPS.philox_uniform(index, 5, 1 << 40, 0),
                OPS.philox_bernoulli(index, 6, 0.25, 42, 3))
    index, compiled = _index(device), _compiled(fn)
    want = fn(index)
    assert_bitwise(compiled(index), want)
    compiled.check_traced(want)


@pytest.mark.parametrize("device", devices())
def test_compile_smoothing(device, backend):
    def fn(params, grads, votes, sel, est, table):
        q = OPS.quantize_analytic(grads, 0.2, 0.05)
        m = OPS.quantize_mc(grads, 0.2, 0.3, 4, 8, table, 99, 3, 0.05)
        step = OPS.quantized_step_analytic_(params, grads, 0.2, 0.01, 0.05, True)  # mutates params
        step_mc = OPS.quantized_step_mc_(params, grads, 0.2, 0.3, 4, 8, table, 7, 1, 0.01, 0.05, False)
        nonfinite = OPS.vote_accumulate_(votes, grads, 0.2)  # mutates votes
        fin = OPS.vote_finalize(sel, est, 4, 8, table, 0.3, 0.05)
        return q, m, step, step_mc, nonfinite, fin

    grads = _grads(torch.bfloat16, device, seed=4)
    params, votes = _params(grads), _votes(grads, torch.int32)
    sel, est = _vote_counts(grads, 4, torch.int16, 5), _vote_counts(grads, 8, torch.int32, 6)
    table = _table(8, device)
    e_params, e_votes = _clone(params), _clone(votes)
    want = fn(e_params, grads, e_votes, sel, est, table)
    compiled = _compiled(fn)
    got = compiled(params, grads, votes, sel, est, table)
    assert_bitwise(got, want)
    compiled.check_traced(want)
    assert_bitwise(params, e_params, "params after the steps")
    assert_bitwise(votes, e_votes, "votes after accumulating")
    assert any(not torch.equal(p, q) for p, q in zip(params, _params(grads))), "the steps changed nothing"


@pytest.mark.parametrize("device", devices())
def test_compile_fragile(device, backend):
    # fragile_compact's output size depends on the radii: the fake returns an unbacked size, which
    # dynamo keeps symbolic inside the graph (a custom op with a registered fake needs no
    # capture_dynamic_output_shape_ops, which only concerns aten ops like nonzero). The later ops
    # run on that unbacked size, so fullgraph proves the whole chain traces without a break.
    def fn(values, radii):
        index, value, radius = OPS.fragile_compact(values, radii, 0.05)
        return index, value * 2.0, radius.sum()

    values = make_list([33, 1025, 6], LAYOUTS, torch.float16, device, seed=2)
    radii = _radii_for(values)
    compiled = _compiled(fn)
    got, want = compiled(values, radii), fn(values, radii)
    assert 0 < want[0].numel() < 1064  # both branches are exercised
    assert_bitwise(got, want)
    compiled.check_traced(want)


@pytest.mark.parametrize("device", devices())
def test_compile_codecs(device, backend):
    def fn(x, recon, codes_out, scales_out, y, out):
        codes, scales = OPS.blockwise_quantize(x, 4, 64)
        OPS.blockwise_dequantize_(out, codes, scales, 4, 64)                  # mutates out
        OPS.delta_encode_(x, recon, codes_out, scales_out, 8, 130)          # mutates recon, codes, scales
        OPS.dequantize_axpy_(y, 0.5, codes_out, scales_out, 8, 130)         # mutates y
        return codes, scales, OPS.dequantize_dot(codes, scales, y, 4, 64)

    sizes = [300, 63, 6, 1]
    x = make_list(sizes, LAYOUTS, torch.bfloat16, device, seed=7)

    def mutable():
        codes, scales = _ops.empty_codes(x, 8, 130)
        return (make_list(sizes, LAYOUTS, torch.float32, device, seed=8, scale=0.1),
                [torch.zeros_like(c) for c in codes], [torch.zeros_like(s) for s in scales],
                make_list(sizes, LAYOUTS, torch.bfloat16, device, seed=9),
                [torch.zeros_like(t) for t in x])

    eager_state, compiled_state = mutable(), mutable()
    want = fn(x, *eager_state)
    compiled = _compiled(fn)
    got = compiled(x, *compiled_state)
    assert_bitwise(got, want)
    compiled.check_traced(want)
    assert_bitwise(list(compiled_state), list(eager_state), "mutated lists")


@pytest.mark.parametrize("device", devices())
def test_compile_select(device, backend):
    def fn(scores, params, grads, masks):
        hist = OPS.select_histogram(scores, 1, 0, 0, 0, 0, 0, 16)
        ties = OPS.select_tie_boundary(scores, 1, 0, 0, 0, 0xBE000000, 3)
        count = OPS.select_apply_(params, scores, [], masks, 1, 0, 0, 0, 0xBE000000, 100, 1, 0.1, 0, 0)  # mutates
        sq = OPS.select_mask_grad_(grads, scores, 2, 5, 1, 7, 0xC0000000, 0)                             # mutates
        near = OPS.select_histogram_near(scores, 1, 0, 0, 0, 20)
        fused = OPS.select_apply_bin_(params, scores, [], masks, 1, 0, 0, 0, 0xBE, 8, 5, 1, 0.5, 0, 0)    # mutates
        return hist, ties, count, sq, near, fused

    sizes = [37, 1, 255, 6]
    scores = make_list(sizes, LAYOUTS, torch.float16, device, seed=4)

    def mutable():
        params = make_list(sizes, LAYOUTS, torch.float32, device, seed=5)
        return (params, make_list(sizes, LAYOUTS, torch.float32, device, seed=6),
                [torch.zeros(p.shape, dtype=torch.bool, device=device) for p in params])

    eager_state, compiled_state = mutable(), mutable()
    want = fn(scores, *eager_state)
    compiled = _compiled(fn)
    got = compiled(scores, *compiled_state)
    assert_bitwise(got, want)
    compiled.check_traced(want)
    assert_bitwise(list(compiled_state), list(eager_state), "mutated lists")


@pytest.mark.parametrize("device", devices())
def test_compile_replay(device, backend):
    def fn(out, x, y, weights, biases, w, buffer, dw, recorded, W, P):
        OPS.layer_chain_grad_sums_(out, x, y, weights, biases, [0, 1, 0], 3)                     # mutates
        total = OPS.deltagrad_qn_step_(w, buffer, dw, recorded, W, P, 0.7, None, None, -0.1, 1.1, 1e-3, 0.05,
                                       0.9, True, False)                                          # mutates
        return total, out[0].sum(dtype=torch.float64) + total

    def mutable():
        out, x, y, weights, biases, _, _ = _chain(torch.float32, device, split=3)
        w, buffer, dw, recorded, W, P = _qn_step(device, momentum=0.9)[:6]
        return (out, x, y, weights, biases, w, buffer, dw, recorded, W, P)

    eager_state, compiled_state = mutable(), mutable()
    want = fn(*eager_state)
    compiled = _compiled(fn)
    got = compiled(*compiled_state)
    assert_bitwise(got, want)
    compiled.check_traced(want)
    assert_bitwise(list(compiled_state[0]) + list(compiled_state[5:7]), list(eager_state[0]) + list(eager_state[5:7]),
                   "mutated tensors")
