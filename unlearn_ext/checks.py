"""Argument checks shared by the public op APIs (rng, pcmu.smoothing, history, perturbation):
friendly Python errors before a kernel sees bad input. Kernels check again (TORCH_CHECK); these
name the argument the user wrote."""
from __future__ import annotations

import numbers
import operator
from typing import Sequence

import numpy as np
import torch

from . import ops

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def as_tensor_list(tensors, name: str) -> list[torch.Tensor]:
    """A tensor or an iterable of tensors as a list; anything else is named."""
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    out = list(tensors)
    for i, t in enumerate(out):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] is a {type(t).__name__}, not a tensor")
    return out


def check_float_list(tensors: Sequence[torch.Tensor], name: str) -> None:
    """One floating dtype (fp32/fp16/bf16) and one device for the whole list, with kernels for it."""
    for i, t in enumerate(tensors):
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}[{i}] has dtype {t.dtype}; expected float32, float16 or bfloat16")
        if t.dtype != tensors[0].dtype:
            raise TypeError(f"all tensors in {name} must share one dtype: {name}[0] is "
                            f"{tensors[0].dtype}, {name}[{i}] is {t.dtype}")
        if t.device != tensors[0].device:
            raise ValueError(f"all tensors in {name} must be on one device: {name}[0] is on "
                             f"{tensors[0].device}, {name}[{i}] is on {t.device}")
    if tensors:
        ops.check_device(tensors[0].device)


def seed_args(seed: int, offset: int) -> tuple[int, int]:
    """The RNG contract's seed and offset are unsigned 64-bit; the op schemas carry them as int64."""
    for name, v in (("seed", seed), ("offset", offset)):
        if not isinstance(v, (int, np.integer)) or not 0 <= int(v) < 2**64:
            raise ValueError(f"{name} must be an integer in [0, 2^64), got {v!r}")
    to_signed = lambda v: int(v) - 2**64 if int(v) >= 2**63 else int(v)  # noqa: E731
    return to_signed(seed), to_signed(offset)


def is_whole_number(value, least: int) -> bool:
    """An integer >= least, as option checks take it: a bool, or a float that happens to be whole,
    is not one."""
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= least


def check_count(value, name: str) -> int:
    """An integer argument (n0, n, draws, bits, block_size) as int; 1.5 is refused, not truncated."""
    if isinstance(value, bool):
        raise TypeError(f"unlearn_ext: {name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"unlearn_ext: {name} must be an integer, got {value!r}") from None
