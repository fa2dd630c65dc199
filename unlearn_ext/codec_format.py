"""The history codecs' format, shared by the kernels' wrappers, their fakes, the reference and
the history store: block geometry (block sizes, blocks per tensor, code bytes and dtype), the
codebooks' names and the "normal" codebook's levels, argument checks, and each codebook's error
bound. The codecs' arithmetic is in csrc/include/unlearn/codecs.h and its pure-PyTorch truth in
reference/codecs.py (whose docstring defines the codebooks); this module holds only what code on
every layer must agree on, so that production code never reads it from the reference.
"""
from __future__ import annotations

import torch

MIN_BLOCK, MAX_BLOCK = 64, 4096
LEVELS = ("linear", "normal", "companded")
COMPAND_MAX = 64516.0  # 127 * (127 + 3 * 127): the companded level of the absmax


def check_codec_args(bits: int, block_size: int, levels: str = "linear") -> None:
    if bits not in (8, 4):
        raise ValueError(f"bits must be 8 (int8 codes) or 4 (int4 codes), got {bits}")
    if not (MIN_BLOCK <= block_size <= MAX_BLOCK) or block_size % 2:
        raise ValueError(f"block_size must be an even number in [{MIN_BLOCK}, {MAX_BLOCK}], got {block_size}")
    if levels not in LEVELS:
        raise ValueError(f"levels must be 'linear', 'normal' (4-bit) or 'companded' (8-bit), got {levels!r}")
    if levels == "normal" and bits != 4:
        raise ValueError(f"levels 'normal' is a 4-bit codebook, got bits {bits}")
    if levels == "companded" and bits != 8:
        raise ValueError(f"levels 'companded' is an 8-bit codebook, got bits {bits}")


def normal4_levels() -> torch.Tensor:
    """The 16 float32 levels of the "normal" codebook, ascending (defined in reference/codecs.py's docstring). Computed in
    float64 with torch.special.ndtri (the normal quantile function), rounded once to float32."""
    k = torch.arange(-7, 8, dtype=torch.float64)
    q = torch.special.ndtri(0.5 + 0.44 * k / 7)
    inner = 0.8 * q / q[-1]
    return torch.cat([inner, torch.ones(1, dtype=torch.float64)]).to(torch.float32)


def max_codebook_error(bits: int, levels: str = "linear") -> float:
    """max over y in [-1, 1] of the distance to the nearest level, as a fraction of the block's
    absmax (the codec's error bound, before float roundings): half the largest gap between levels,
    or the distance from -1 to the lowest level where that is larger ("normal")."""
    if levels == "normal":
        lv = normal4_levels().double()
        return max(float((lv[1:] - lv[:-1]).max()) / 2, float(lv[0] + 1))
    if levels == "companded":
        return 443.0 / COMPAND_MAX   # half of the top gap, 127 * 508 - 126 * 505 = 886
    return 0.5 / qmax_of(bits)


def qmax_of(bits: int) -> float:
    return 127.0 if bits == 8 else 7.0


def code_numel(numel: int, bits: int) -> int:
    return numel if bits == 8 else (numel + 1) // 2


def block_count(numel: int, block_size: int) -> int:
    return -(-numel // block_size)


def code_dtype(bits: int) -> torch.dtype:
    """int8 codes are int8; int4 codes are packed two per uint8 byte."""
    return torch.int8 if bits == 8 else torch.uint8
