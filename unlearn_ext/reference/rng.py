"""Pure-PyTorch Philox4x32-10 (docs/design.md §3), bit-compatible with csrc/include/unlearn/philox.h.

32-bit words live in int64 tensors holding values in [0, 2^32). Products of two 32-bit words do not
fit a signed 64-bit integer, so mul_hi/lo splits one factor into 16-bit halves.
"""
from __future__ import annotations

import torch

from ..rng_format import MASK32, UNIFORM_LEVELS  # noqa: F401

M0, M1 = 0xD2511F53, 0xCD9E8D57
W0, W1 = 0x9E3779B9, 0xBB67AE85


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of a * m for 32-bit a (tensor) and m (constant)."""
    a_lo = a & 0xFFFF
    a_hi = a >> 16
    p_lo = a_lo * m  # < 2^48
    p_hi = a_hi * m  # < 2^48
    s = ((p_hi & 0xFFFF) << 16) + p_lo  # < 2^49
    return (p_hi >> 16) + (s >> 32), s & MASK32


def philox4x32_10(counter: tuple, key: tuple) -> tuple[torch.Tensor, ...]:
    """One Philox4x32-10 block for broadcastable counter words (c0, c1, c2, c3) and key (k0, k1).

    Words are int64 tensors (or ints) in [0, 2^32); returns four int64 tensors.
    """
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) for c in counter)
    k0, k1 = (int(k) & MASK32 for k in key)
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, M0)
        hi1, lo1 = _mulhilo(c2, M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + W0) & MASK32
        k1 = (k1 + W1) & MASK32
    return c0, c1, c2, c3


def _u64(v: int) -> int:
    return int(v) % (1 << 64)


def philox_words(element_index: torch.Tensor, draws: int, seed: int, offset: int) -> torch.Tensor:
    """Words [*, draws] (int64 in [0, 2^32)): draw j of element i is word j % 4 of block
    (offset + j // 4, i) under key = seed."""
    if draws < 0:
        raise ValueError(f"draws must be >= 0, got {draws}")
    seed, offset = _u64(seed), _u64(offset)
    idx = element_index.to(torch.int64).reshape(-1)
    # The subsequence is the element index read as unsigned 64-bit: split into 32-bit words
    # (masking after an arithmetic shift gives the two's-complement words of negative values).
    e_lo = idx & MASK32
    e_hi = (idx >> 32) & MASK32
    blocks = (draws + 3) // 4
    cols = []
    for b in range(blocks):
        ctr = (offset + b) % (1 << 64)
        words = philox4x32_10((ctr & MASK32, ctr >> 32, e_lo, e_hi), (seed & MASK32, seed >> 32))
        cols.extend(w.reshape(-1) for w in words)
    out = torch.stack(cols[:draws], dim=-1) if draws else torch.empty(idx.numel(), 0, dtype=torch.int64)
    return out.reshape(*element_index.shape, draws)


def uniform_from_words(words: torch.Tensor) -> torch.Tensor:
    """The contract's uniform ((x >> 8) + 0.5) * 2^-24, exact in float64, strictly inside (0, 1)."""
    return ((words >> 8).to(torch.float64) + 0.5) * 2.0**-24


def philox_bits(element_index: torch.Tensor, draws: int, seed: int, offset: int) -> torch.Tensor:
    """Like the op: the words reinterpreted as int32 (the same bits)."""
    w = philox_words(element_index, draws, seed, offset)
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def philox_uniform(element_index: torch.Tensor, draws: int, seed: int, offset: int) -> torch.Tensor:
    return uniform_from_words(philox_words(element_index, draws, seed, offset))


def philox_bernoulli(element_index: torch.Tensor, draws: int, p: float, seed: int, offset: int) -> torch.Tensor:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    return philox_uniform(element_index, draws, seed, offset) < p
