"""The CPU list walker (csrc/cpu/cpu_walk.h) combines per-chunk partials in chunk order, so results
never depend on the thread count: the same bits with 1 thread and with several, including the
order-sensitive float64 sum of dequantize_dot and the order of fragile_compact's output."""
import torch

from unlearn_ext import ops as _ops
from conftest import make_list, requires_compiled

# Several chunks of 2^15 elements, tensors that straddle chunk boundaries, empty tensors.
SIZES = [(1 << 15) + 3, 0, 1, 70001, 255, 0, (1 << 16) - 1]


def _run_all():
    g = make_list(SIZES, ("contiguous",), torch.float32, "cpu", seed=81)
    out = {}
    q = _ops.quantize_analytic(g, 0.1, 0.05)
    out["analytic"] = list(q[0]) + list(q[1]) + [q[2], q[3]]
    codes, scales = _ops.blockwise_quantize(g, 8, 256)
    out["dot"] = [_ops.dequantize_dot(codes, scales, g, 8, 256)]
    out["fragile"] = list(_ops.fragile_compact(g, [(x.abs() - 0.1).abs() for x in g], 0.01))
    p = [x.clone() for x in g]
    codes = [torch.sign(x).to(torch.int8) for x in g]
    _ops.apply_codes_(p, codes, 0.25)
    out["apply_codes"] = p
    return out


@requires_compiled
def test_results_do_not_depend_on_thread_count():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run_all()
        torch.set_num_threads(max(2, before))
        many = _run_all()
    finally:
        torch.set_num_threads(before)
    for name in one:
        for a, b in zip(one[name], many[name]):
            assert torch.equal(a, b), name
