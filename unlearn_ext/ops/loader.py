"""Whether the compiled extension serves the ops: `unlearn_ext._C`, which registers its CPU (and CUDA)
kernels with the dispatcher on import, when it is importable; else the pure-PyTorch reference, the
ops' default kernel (registry.py), serves every call (one warning). UNLEARN_EXT_BACKEND=reference
forces the reference."""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch

_C = None
_LOAD_ERROR: str | None = None  # why the extension is not loaded, in words for the warning
if os.environ.get("UNLEARN_EXT_BACKEND", "").lower() != "reference":
    # Asked first, so that a missing build is reported as such: importing a submodule that does not
    # exist from a package still initializing raises an ImportError that blames a circular import.
    if importlib.util.find_spec(f"{__package__.rsplit('.', 1)[0]}._C") is None:
        _LOAD_ERROR = ("not built: no unlearn_ext/_C extension module; build it with `pip install "
                       "--no-build-isolation -e .` or `make`")
    else:
        try:
            from .. import _C  # noqa: F811  (registers the ops with the dispatcher on import)
        except ImportError as exc:  # built, but it does not load (e.g. built against another torch)
            _LOAD_ERROR = f"built but failed to load ({exc}); rebuild it against this torch"

_warned = False


def compiled() -> bool:
    """True when the compiled extension is loaded."""
    return _C is not None


def cuda_built() -> bool:
    return _C is not None and _C.built_with_cuda()


def backend() -> str:
    """Which implementation serves the ops: 'compiled (cpu+cuda)', 'compiled (cpu)' or 'reference'."""
    if _C is None:
        return "reference"
    return "compiled (cpu+cuda)" if _C.built_with_cuda() else "compiled (cpu)"


def check_device(device: torch.device) -> None:
    """Refuses devices the loaded build has no kernels for, with the way out in the message."""
    if _C is None:
        return  # the reference runs on any device torch supports
    if device.type == "cuda" and not _C.built_with_cuda():
        raise RuntimeError(
            "unlearn_ext was built without CUDA kernels but got a CUDA tensor. Rebuild with a CUDA "
            "build of torch and nvcc (UNLEARN_EXT_CUDA=1 CUDA_HOME=/usr/local/cuda pip install "
            "--no-build-isolation -e .), or move the tensors to the CPU."
        )
    if device.type not in ("cpu", "cuda", "meta"):
        raise RuntimeError(f"unlearn_ext has no kernels for device type '{device.type}'")


def impl(name: str):
    """The op torch.ops.unlearn_ext.<name>; the first call without the compiled extension warns once
    that the (slow) reference serves it."""
    global _warned
    if _C is None and not _warned:
        _warned = True
        why = _LOAD_ERROR if _LOAD_ERROR is not None else "not loaded (UNLEARN_EXT_BACKEND=reference)"
        warnings.warn(f"unlearn_ext: compiled extension {why}; using the pure-PyTorch reference, which is "
                      "correct but slow.", RuntimeWarning, stacklevel=3)
    return getattr(torch.ops.unlearn_ext, name)
