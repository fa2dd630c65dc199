"""In-place ops under autograd behave like torch's own in-place ops (csrc/ops.cpp): the
version counters of mutated tensors are bumped, a leaf that requires grad is refused in grad mode
(and accepted under torch.no_grad(), which is how PCMU updates parameters), and a backward through
a mutated tensor or a float output raises instead of returning a wrong gradient."""
from __future__ import annotations

import pytest
import torch

import unlearn_ext as ue

from conftest import requires_compiled

pytestmark = requires_compiled

OPS = torch.ops.unlearn_ext


def _floats(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(5, generator=gen), torch.randn(2, 3, generator=gen)]


def _coded(bits=8):
    return OPS.blockwise_quantize(_floats(1), bits, 64)


def _in_place_calls():
    """op name -> (build: () -> args, positions of the mutated lists; the first one is float)."""
    table = ue.radius_table(8, 1e-3, "cpu")
    ternary = [torch.tensor([1, 0, -1, 1, 0], dtype=torch.int8), torch.ones(2, 3, dtype=torch.int8)]
    return {
        "quantized_step_analytic_": (lambda: (_floats(2), _floats(3), 0.2, 0.01, 0.05, True), (0,)),
        "quantized_step_mc_": (lambda: (_floats(2), _floats(3), 0.2, 0.3, 4, 8, table, 1, 0, 0.01, 0.05, True),
                               (0,)),
        "apply_codes_": (lambda: (_floats(2), ternary, 0.01), (0,)),
        "blockwise_dequantize_": (lambda: (_floats(2), *_coded(), 8, 64), (0,)),
        "dequantize_axpy_": (lambda: (_floats(2), 0.5, *_coded(4), 4, 64), (0,)),
        "delta_encode_": (lambda: (_floats(3), _floats(2), *map(lambda p: [t.zero_() for t in p], _coded()), 8, 64),
                          (1, 2, 3)),
        # select family: key |score|, threshold -1 selects every coordinate; action 1 scales by alpha
        "select_apply_": (lambda: (_floats(2), _floats(4), [], [], 1, 0, 0, 0, -1, 0, 1, 0.5, 0, 0), (0,)),
        "select_mask_grad_": (lambda: (_floats(2), _floats(4), 1, 0, 0, 0, -1, 0), (0,)),
        # every |score| key has its top bit set: all of them lie above the bin "top bit 0"
        "select_apply_bin_": (lambda: (_floats(2), _floats(4), [], [], 1, 0, 0, 0, 0, 1, 0, 1, 0.5, 0, 0), (0,)),
        # a 5 -> 3 -> tanh -> 2 chain (weight, bias; weight, no bias) on 4 rows: out holds 5*3 + 3 + 3*2
        "layer_chain_grad_sums_": (lambda: ([torch.zeros(24)], *_chain_inputs(), -1), (0,)),
        # d = 5 flat weights, one (s, y) pair: W 5 x 2, P 2 x 5; a momentum buffer (the second written)
        "deltagrad_qn_step_": (lambda: (*_step_inputs(), 0.5, None, None, 0.0, 1.0, 0.0, 0.1, 0.9, False, False),
                               (0, 1)),
        # two steps (one with the chain's 4 rows) of that chain on its d = 24 flat weights, with a
        # momentum buffer: w, buffer, chain_weights and grad written
        "deltagrad_qn_run_": (lambda: _run_inputs(), (0, 1, 2, 3)),
    }


def _run_inputs():
    """deltagrad_qn_run_'s arguments (the IN_PLACE row): the chain of _chain_inputs as shapes."""
    gen = torch.Generator().manual_seed(11)
    x, y, *_ = _chain_inputs()
    w, buffer, chain_weights, grad = torch.randn(24, generator=gen), torch.randn(24, generator=gen), torch.zeros(24), \
        torch.zeros(24)
    W, P = (torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((24, 2), (2, 24)))
    recorded = [torch.randn(24, generator=gen) for _ in range(4)]
    return (w, buffer, chain_weights, grad, recorded[:2], recorded[2:], [x], [y], [0, 4], [0.1, 0.1], [1.0, 1.0],
            [-0.1, -0.1], [3, 5, 1, 2, 3, 0], [0, 1, 0], W, P, 0.5, 0.0, 0.9, False, True)


def _step_inputs():
    """(w, buffer, dw, recorded, W, P) of deltagrad_qn_step_ (the IN_PLACE row)."""
    gen = torch.Generator().manual_seed(10)
    w, buffer, dw, recorded = (torch.randn(5, generator=gen) for _ in range(4))
    W, P = (torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((5, 2), (2, 5)))
    return w, buffer, dw, recorded, W, P


def _chain_inputs():
    """(x, y, weights, biases, layers) of layer_chain_grad_sums_ (the IN_PLACE row)."""
    gen = torch.Generator().manual_seed(9)
    x, y = torch.randn(4, 5, generator=gen), torch.tensor([0, 1, 1, 0])
    weights = [torch.randn(3, 5, generator=gen), torch.randn(2, 3, generator=gen)]
    return x, y, weights, [torch.randn(3, generator=gen), None], [0, 1, 0]


IN_PLACE = _in_place_calls()


def _tensors(value):
    """The tensors of a written argument: a Tensor[] or a single Tensor."""
    return [value] if isinstance(value, torch.Tensor) else list(value)


def _each(value, f):
    """f applied to each tensor of a written argument, keeping its kind (list or single tensor)."""
    return f(value) if isinstance(value, torch.Tensor) else [f(t) for t in value]


def test_every_mutating_op_is_covered():
    mutating = {name for name in ue.ops.__dict__ if name.endswith("_") and not name.startswith("_")
                and hasattr(OPS, name)}
    assert mutating == set(IN_PLACE) | {"vote_accumulate_"}


@pytest.mark.parametrize("name", sorted(IN_PLACE))
def test_version_counters_are_bumped(name):
    build, mutated = IN_PLACE[name]
    args = build()
    before = [[t._version for t in _tensors(args[i])] for i in mutated]
    getattr(OPS, name)(*args)
    after = [[t._version for t in _tensors(args[i])] for i in mutated]
    assert all(a > b for bs, as_ in zip(before, after) for b, a in zip(bs, as_)), (before, after)


def test_vote_accumulate_bumps_the_counters_version():
    votes = [torch.zeros(2, 5, dtype=torch.int16), torch.zeros(2, 2, 3, dtype=torch.int16)]
    OPS.vote_accumulate_(votes, _floats(), 0.1)
    assert all(v._version > 0 for v in votes)


def _with_leaves(args, position):
    args = list(args)
    args[position] = _each(args[position], lambda t: t.detach().requires_grad_())
    return args


@pytest.mark.parametrize("name", sorted(IN_PLACE))
def test_leaf_requiring_grad_is_refused_in_grad_mode(name):
    build, mutated = IN_PLACE[name]
    args = _with_leaves(build(), mutated[0])
    before = [t.detach().clone() for t in _tensors(args[mutated[0]])]
    with pytest.raises(RuntimeError, match="a leaf Variable that requires grad is being used in an in-place"):
        getattr(OPS, name)(*args)
    assert all(torch.equal(a, b) for a, b in zip(_tensors(args[mutated[0]]), before)), "refused, yet written"


@pytest.mark.parametrize("name", sorted(IN_PLACE))
def test_leaf_requiring_grad_is_updated_under_no_grad(name):
    build, mutated = IN_PLACE[name]
    plain = build()
    getattr(OPS, name)(*plain)
    leaves = _with_leaves(build(), mutated[0])
    with torch.no_grad():
        getattr(OPS, name)(*leaves)
    for got, want in zip(_tensors(leaves[mutated[0]]), _tensors(plain[mutated[0]])):
        assert got.requires_grad and got.is_leaf
        assert torch.equal(got.detach(), want)


@pytest.mark.parametrize("name", sorted(IN_PLACE))
def test_backward_through_a_mutated_non_leaf_raises(name):
    build, mutated = IN_PLACE[name]
    args = list(build())
    w = _each(args[mutated[0]], lambda t: t.detach().requires_grad_())
    args[mutated[0]] = _each(w, lambda t: t * 2)  # non-leaves: the old gradient 2 would be silently wrong
    getattr(OPS, name)(*args)
    with pytest.raises(RuntimeError, match=f"derivative for unlearn_ext::{name} is not implemented"):
        sum(t.sum() for t in _tensors(args[mutated[0]])).backward()


@pytest.mark.parametrize("name", sorted(IN_PLACE))
def test_backward_through_a_saved_then_mutated_tensor_raises(name):
    build, mutated = IN_PLACE[name]
    args = list(build())
    w = _each(args[mutated[0]], lambda t: t.detach().requires_grad_())
    args[mutated[0]] = _each(w, lambda t: t.exp())  # exp saves its result for the backward
    saved_by = [t.exp() for t in _tensors(args[mutated[0]])]
    with torch.no_grad():  # even where no history is rebased, the version check catches it
        getattr(OPS, name)(*args)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        sum(t.sum() for t in saved_by).backward()


def test_backward_through_float_outputs_raises():
    codes, scales = _coded(4)
    v = [t.requires_grad_() for t in _floats()]
    dot = OPS.dequantize_dot(codes, scales, v, 4, 64)
    with pytest.raises(RuntimeError, match="derivative for unlearn_ext::dequantize_dot is not implemented"):
        dot.backward()
    min_radius, _ = OPS.quantized_step_analytic_(_floats(2), v, 0.2, 0.01, 0.05, True)
    with pytest.raises(RuntimeError, match="not implemented"):
        min_radius.backward()


def test_an_optional_tensor_list_is_an_input_like_the_others():
    """layer_chain_grad_sums_'s biases are a Tensor?[] (a generic list, not a tensor list): a bias
    that requires grad gives the output a NotImplemented gradient function as a weight would, and a
    bias carrying a forward-mode tangent is refused, instead of both being silently ignored."""
    x, y, weights, biases, layers = _chain_inputs()
    out = [torch.zeros(24)]
    OPS.layer_chain_grad_sums_(out, x, y, weights, [biases[0].requires_grad_(), None], layers, -1)
    with pytest.raises(RuntimeError, match="derivative for unlearn_ext::layer_chain_grad_sums_ is not implemented"):
        out[0].sum().backward()
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(biases[0].detach(), torch.ones(3))
        with pytest.raises(NotImplementedError, match="has no forward-mode derivative"):
            OPS.layer_chain_grad_sums_([torch.zeros(24)], x, y, weights, [dual, None], layers, -1)
