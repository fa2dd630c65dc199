"""The RNG contract (docs/design.md §3), exposed: Philox4x32-10 words, uniforms and Bernoulli draws
keyed by (seed, offset, global element index), bit-identical on the CPU kernel, the CUDA kernel
and the reference — and the one rule for advancing the offset between calls.

Offset rule: a call that draws `draws` values per element consumes ceil(draws / 4) Philox blocks
per element; a sequence of calls (training steps, selection rounds) advances the offset by that
much per call, so call t uses offset t * blocks_per_call and every call draws fresh numbers while
a run replays exactly from (seed, t).
"""
from __future__ import annotations

import torch

from . import ops
from .checks import check_count, seed_args


def blocks_for_draws(draws: int) -> int:
    """Philox blocks (four 32-bit words each) that `draws` values per element consume."""
    return (int(draws) + 3) // 4


def call_offset(call_index: int, blocks_per_call: int, start: int = 0) -> int:
    """The offset of call `call_index` of a sequence whose calls consume `blocks_per_call` blocks
    per element each (modulo 2^64, the contract's counter width)."""
    return (int(start) + int(call_index) * int(blocks_per_call)) % 2**64


def philox_bits(element_index: torch.Tensor, draws: int, *, seed: int, offset: int = 0) -> torch.Tensor:
    """The contract's 32-bit words (as int32 bit patterns), shape (*element_index.shape, draws)."""
    s, o = seed_args(seed, offset)
    return ops.philox_bits(element_index, check_count(draws, "draws"), s, o)


def philox_uniform(element_index: torch.Tensor, draws: int, *, seed: int, offset: int = 0) -> torch.Tensor:
    """The contract's uniforms ((x >> 8) + 0.5) 2^-24, exact, as float64."""
    s, o = seed_args(seed, offset)
    return ops.philox_uniform(element_index, check_count(draws, "draws"), s, o)


def philox_bernoulli(element_index: torch.Tensor, draws: int, p: float, *, seed: int,
                     offset: int = 0) -> torch.Tensor:
    """Bernoulli(p) draws: u < p for the contract's uniform u."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    s, o = seed_args(seed, offset)
    return ops.philox_bernoulli(element_index, check_count(draws, "draws"), float(p), s, o)
