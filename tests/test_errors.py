"""Bad input gets a clear error naming the problem (docs/design.md §10)."""
import os
import subprocess
import sys

import pytest
import torch

import unlearn_ext as ue
from unlearn_ext import ops as _ops
from unlearn_ext.pcmu.smoothing import radius_table
from conftest import requires_compiled

G = [torch.randn(10), torch.randn(3, 2)]


@pytest.mark.parametrize("kwargs,match", [
    (dict(sigma=0.0), "sigma must be"),
    (dict(sigma=-1.0), "sigma must be"),
    (dict(sigma=float("nan")), "sigma must be"),
    (dict(tau=-0.1), "tau must be"),
    (dict(mode="mc", n=0), r"n \(estimation draws\)"),
    (dict(mode="mc", n0=0), r"n0 \(selection draws\)"),
    (dict(mode="bogus"), "mode must be"),
    (dict(seed=-1), "seed must be"),
    (dict(nonfinite="ignore"), "nonfinite must be"),
])
def test_bad_arguments(kwargs, match):
    args = dict(tau=0.1, sigma=0.2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ue.smooth_quantize(G, **args)


def test_wrong_dtypes():
    with pytest.raises(TypeError, match="expected float32, float16 or bfloat16"):
        ue.smooth_quantize([torch.arange(5)], tau=0.1, sigma=0.2)
    with pytest.raises(TypeError, match="expected float32"):
        ue.smooth_quantize([torch.randn(5, dtype=torch.float64)], tau=0.1, sigma=0.2)
    with pytest.raises(TypeError, match="share one dtype"):
        ue.smooth_quantize([torch.randn(5), torch.randn(5).half()], tau=0.1, sigma=0.2)
    with pytest.raises(TypeError, match="not a tensor"):
        ue.smooth_quantize([torch.randn(5), 3.0], tau=0.1, sigma=0.2)


def test_mismatched_lists():
    with pytest.raises(ValueError, match="params has 1 tensors but grads has 2"):
        ue.smooth_quantize_step_([torch.zeros(10)], G, step_size=0.1, tau=0.1, sigma=0.2)
    with pytest.raises(ValueError, match="does not match"):
        ue.smooth_quantize_step_([torch.zeros(10), torch.zeros(6)], G, step_size=0.1, tau=0.1, sigma=0.2)
    with pytest.raises(ValueError, match="step_size must be finite"):
        ue.smooth_quantize_step_([torch.zeros(10)], [G[0]], step_size=float("inf"), tau=0.1, sigma=0.2)


@requires_compiled
def test_kernels_validate_too():
    """The ops themselves (reachable through torch.ops) refuse bad input with messages."""
    ops = torch.ops.unlearn_ext
    with pytest.raises(RuntimeError, match="radius_table must be a 1-D tensor of n \\+ 1"):
        ops.quantize_mc(G, 0.1, 0.2, 4, 8, radius_table(7), 0, 0, 0.0)
    with pytest.raises(RuntimeError, match="sigma must be"):
        ops.quantize_mc(G, 0.1, 0.0, 4, 8, radius_table(8), 0, 0, 0.0)
    with pytest.raises(RuntimeError, match="tau must be"):
        ops.quantize_mc(G, -1.0, 0.1, 4, 8, radius_table(8), 0, 0, 0.0)
    with pytest.raises(RuntimeError, match="n0 \\(selection draws\\)"):
        ops.quantize_mc(G, 0.1, 0.1, 0, 8, radius_table(8), 0, 0, 0.0)
    with pytest.raises(RuntimeError, match="params has 1 tensors but grads has 2"):
        ops.quantized_step_analytic_([torch.zeros(10)], G, 0.1, 0.1, 0.0, True)
    with pytest.raises(RuntimeError, match="has shape"):
        ops.quantized_step_analytic_([torch.zeros(10), torch.zeros(7)], G, 0.1, 0.1, 0.0, True)
    with pytest.raises(RuntimeError, match="expected float32, float16 or bfloat16"):
        ops.quantize_analytic([torch.randn(4, dtype=torch.float64)], 0.1, 0.0)
    with pytest.raises(RuntimeError, match=r"must have shape \(2, \*grads"):
        ops.vote_accumulate_([torch.zeros(3, 10, dtype=torch.int16)], [G[0]], 0.1)
    with pytest.raises(RuntimeError, match="int16 or int32"):
        ops.vote_accumulate_([torch.zeros(2, 10)], [G[0]], 0.1)
    with pytest.raises(RuntimeError, match="element_index must be int64"):
        ops.philox_bits(torch.arange(3, dtype=torch.int32), 2, 0, 0)


def test_cuda_tensor_on_cpu_only_build():
    if ue.cuda_built():
        pytest.skip("this build has CUDA kernels")
    if not ue.compiled():
        pytest.skip("reference backend runs on any device")
    with pytest.raises(RuntimeError, match="built without CUDA kernels"):
        _ops.check_device(torch.device("cuda"))


def test_empty_lists_work():
    res = ue.smooth_quantize([], tau=0.1, sigma=0.2)
    assert res.codes == [] and res.min_radius == float("inf")
    stats = ue.smooth_quantize_step_([], [], step_size=0.1, tau=0.1, sigma=0.2, mode="mc")
    assert stats.applied


def test_reference_fallback_in_subprocess():
    code = (
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import unlearn_ext as ue\n"
        "    r = ue.smooth_quantize([torch.randn(7)], tau=0.1, sigma=0.2, mode='mc', n0=2, n=4)\n"
        "    r = ue.smooth_quantize([torch.randn(7)], tau=0.1, sigma=0.2)\n"
        "assert ue.backend() == 'reference', ue.backend()\n"
        "assert sum('pure-PyTorch reference' in str(x.message) for x in w) == 1, [str(x.message) for x in w]\n"
        "print('ok')\n"
    )
    env = dict(os.environ, UNLEARN_EXT_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.parametrize("mode", ["analytic", "mc"])
def test_step_refuses_params_whose_elements_share_memory(mode):
    """A parameter view whose elements are one memory location (as_strided with stride 0) would be
    written several times: refused before any work, as torch's in-place ops refuse it."""
    base = torch.arange(3.0)
    params = [base.as_strided((10,), (0,)), torch.zeros(3, 2)]
    with pytest.raises(RuntimeError, match="quantized_step_" + mode + "_ writes a tensor whose elements share memory"):
        ue.smooth_quantize_step_(params, G, step_size=0.1, tau=0.1, sigma=0.2, mode=mode)
    assert torch.equal(base, torch.arange(3.0)) and torch.equal(params[1], torch.zeros(3, 2))
