"""The RNG contract (docs/design.md §3): Philox4x32-10 known answers, the kernels' words, uniforms and
Bernoulli draws bit for bit against the pure-PyTorch reference, and statistical sanity."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

import unlearn_ext as ue
from unlearn_ext import reference
from conftest import devices, signed64

MASK32 = 0xFFFFFFFF

# The published Random123 known-answer vectors of Philox4x32-10, as listed in docs/design.md §3:
# (counter words; key words) -> output words.
KNOWN_ANSWERS = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]

# Seeds and offsets as unsigned 64-bit values (the public API maps >= 2^63 to the schema's int64).
SEED_OFFSETS = [
    (0, 0),
    (123, 7),
    (2**32 + 5, 2**32 - 1),         # the block counter crosses 2^32 from draw 4 on
    (2**63, 2**32 - 2),             # smallest seed that needs the signed mapping
    (2**63 + 12345, 2**40 + 3),
    (2**64 - 1, 2**64 - 1),         # counter wraps around 2^64 from draw 4 on
    (0xA4093822299F31D0, 0x85A308D3243F6A88),
]
DRAWS = [0, 1, 3, 4, 5, 13]

# Element indices (the counter's subsequence words) incl. >= 2^32 and the unsigned top of the range,
# which an int64 tensor holds as negative values.
SPECIAL_INDICES = [2**32 - 1, 2**32, 2**32 + 1, 2**40 + 3, 2**62 + 17, 2**63 - 1, -(2**63), -2, -1]


def index_tensor(device="cpu"):
    return torch.cat([torch.arange(0, 257), torch.tensor(SPECIAL_INDICES)]).to(device)


def unsigned_words(t):
    return t.to(torch.int64) & MASK32


# ---- known answers --------------------------------------------------------------------------------

@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_reference_known_answers(counter, key, expected):
    words = reference.philox4x32_10(counter, key)
    assert tuple(int(w) for w in words) == expected


def test_reference_block_function_broadcasts():
    """Counter words given as tensors give the same block per entry as the scalar form."""
    counter, key, expected = KNOWN_ANSWERS[2]
    c = [torch.full((2, 3), w, dtype=torch.int64) for w in counter]
    out = reference.philox4x32_10(c, key)
    for w, e in zip(out, expected):
        assert w.shape == (2, 3) and bool((w == e).all())


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_kernel_known_answers(device, counter, key, expected):
    """The compiled op, reached through the public API (which maps unsigned seeds and offsets):
    counter = (offset lo, offset hi, element lo, element hi), key = seed (lo, hi)."""
    offset = counter[0] | (counter[1] << 32)
    element = counter[2] | (counter[3] << 32)
    seed = key[0] | (key[1] << 32)
    signed_element = element - 2**64 if element >= 2**63 else element
    bits = ue.philox_bits(torch.tensor([signed_element], device=device), 4, seed=seed, offset=offset)
    assert bits.shape == (1, 4) and bits.dtype == torch.int32
    assert [int(b) & MASK32 for b in bits[0].cpu()] == list(expected)


# ---- the draw layout ------------------------------------------------------------------------------

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("seed,offset", SEED_OFFSETS)
def test_draw_layout_matches_block_function(device, seed, offset):
    """Draw j of element i is word (j mod 4) of the block at counter (offset + j div 4, i): checked
    against the reference block function directly (not through reference.philox_words)."""
    idx = index_tensor()
    draws = 9
    bits = unsigned_words(ue.philox_bits(idx.to(device), draws, seed=seed, offset=offset).cpu())
    e_lo, e_hi = idx & MASK32, (idx >> 32) & MASK32
    for b in range((draws + 3) // 4):
        ctr = (offset + b) % 2**64
        block = reference.philox4x32_10((ctr & MASK32, ctr >> 32, e_lo, e_hi), (seed & MASK32, seed >> 32))
        for q in range(4):
            j = 4 * b + q
            if j < draws:
                assert torch.equal(bits[:, j], block[q]), (b, q)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("seed,offset", [(1, 0), (77, 2**32 - 1), (5, 2**64 - 1)])
def test_offset_counts_blocks(device, seed, offset):
    """Advancing the offset by one skips exactly one block of four draws (also across 2^32 and
    around 2^64), so a step that consumed k blocks leaves fresh numbers for the next."""
    idx = index_tensor(device)
    long = ue.philox_bits(idx, 11, seed=seed, offset=offset)
    later = ue.philox_bits(idx, 7, seed=seed, offset=(offset + 1) % 2**64)
    assert torch.equal(long[:, 4:], later)
    # different offsets, seeds and elements give (practically) unrelated words
    other_seed = ue.philox_bits(idx, 11, seed=seed + 1, offset=offset)
    assert float((other_seed == long).float().mean()) < 1e-3
    assert float((long[1:] == long[:-1]).float().mean()) < 1e-3


# ---- kernels == reference -------------------------------------------------------------------------

BERNOULLI_P = [0.0, 5e-324, 2.0**-25, math.nextafter(2.0**-25, 1.0), 1e-6, 0.3, 0.5,
               math.nextafter(0.5, 0.0), 1 - 2.0**-25, 1 - 2.0**-53, 1.0]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("seed,offset", SEED_OFFSETS)
@pytest.mark.parametrize("draws", DRAWS)
def test_words_uniforms_bernoulli_match_reference(device, seed, offset, draws):
    idx = index_tensor(device)
    bits = ue.philox_bits(idx, draws, seed=seed, offset=offset)
    assert bits.shape == (idx.numel(), draws) and bits.dtype == torch.int32 and bits.device == idx.device
    ref_bits = reference.philox_bits(idx.cpu(), draws, seed, offset)  # reference takes unsigned values
    assert torch.equal(bits.cpu(), ref_bits)
    if ue.compiled():  # the op itself, given the schema's signed int64 view of seed and offset
        op_bits = torch.ops.unlearn_ext.philox_bits(idx, draws, signed64(seed), signed64(offset))
        assert torch.equal(op_bits.cpu(), ref_bits)

    u = ue.philox_uniform(idx, draws, seed=seed, offset=offset)
    assert u.dtype == torch.float64 and u.shape == bits.shape
    assert torch.equal(u.cpu(), reference.philox_uniform(idx.cpu(), draws, seed, offset))
    # the contract's formula, from the words
    assert torch.equal(u.cpu(), ((unsigned_words(bits.cpu()) >> 8).double() + 0.5) * 2.0**-24)
    if draws:
        assert float(u.min()) > 0.0 and float(u.max()) < 1.0

    for p in BERNOULLI_P:
        b = ue.philox_bernoulli(idx, draws, p, seed=seed, offset=offset)
        assert b.dtype == torch.bool and b.shape == bits.shape
        assert torch.equal(b.cpu(), u.cpu() < p), p
        assert torch.equal(b.cpu(), reference.philox_bernoulli(idx.cpu(), draws, p, seed, offset)), p


@pytest.mark.parametrize("device", devices())
def test_bernoulli_edge_probabilities(device):
    """p = 0 and tiny p never fire, p = 1 and 1 - eps always do; p just above the lowest uniform
    fires exactly on the lowest 24-bit level."""
    idx = torch.arange(1 << 14, device=device)
    levels = unsigned_words(ue.philox_bits(idx, 4, seed=9, offset=0).cpu()) >> 8
    draw = lambda p: ue.philox_bernoulli(idx, 4, p, seed=9).cpu()  # noqa: E731
    assert not draw(0.0).any() and not draw(5e-324).any() and not draw(2.0**-25).any()
    assert draw(1.0).all() and draw(1 - 2.0**-53).all()
    assert torch.equal(draw(math.nextafter(2.0**-25, 1.0)), levels == 0)
    assert torch.equal(draw(1 - 2.0**-25), levels < 2**24 - 1)
    assert torch.equal(draw(0.5), levels < 2**23)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 5), (), (4, 3), "transposed"])
@pytest.mark.parametrize("draws", [0, 2, 6])
def test_index_shapes(device, shape, draws):
    """Output shape is (*element_index.shape, draws): empty indices, 0 draws, a 0-dim index and a
    non-contiguous 2-D index all work and match the reference."""
    if shape == "transposed":
        idx = (torch.arange(12).reshape(3, 4) * 2**30).to(device).t()
        assert not idx.is_contiguous()
    else:
        idx = torch.arange(math.prod(shape), dtype=torch.int64).reshape(shape).to(device) + 2**33
    for fn, ref_fn, extra in ((ue.philox_bits, reference.philox_bits, ()),
                              (ue.philox_uniform, reference.philox_uniform, ()),
                              (ue.philox_bernoulli, reference.philox_bernoulli, (0.4,))):
        out = fn(idx, draws, *extra, seed=3, offset=2**32 - 1)
        assert out.shape == (*idx.shape, draws)
        assert torch.equal(out.cpu(), ref_fn(idx.cpu(), draws, *extra, 3, 2**32 - 1))


# ---- statistics (fixed seeds; each test states its false-failure rate) ----------------------------

FALSE_FAILURE = 1e-6  # per test: the probability that an ideal generator fails it


def test_uniformity_chi_square_and_ks():
    """2^18 uniforms (2^16 elements x 4 draws) in 256 equal bins: chi-square with 255 dof against
    its (1 - 1e-6) quantile, and a Kolmogorov-Smirnov test at p > 1e-6. For an ideal generator each
    fails with probability 1e-6; with the fixed seed the outcome is deterministic."""
    u = ue.philox_uniform(torch.arange(1 << 16), 4, seed=2024, offset=0).reshape(-1).numpy()
    counts = np.bincount((u * 256).astype(np.int64), minlength=256)
    assert counts.size == 256
    stat, crit, dof = _chi2_uniform(counts)
    assert dof == 255 and stat < crit, (stat, crit)
    assert stats.kstest(u, "uniform").pvalue > FALSE_FAILURE


def _chi2_uniform(counts):
    expected = counts.sum() / counts.size
    stat = float(((counts - expected) ** 2 / expected).sum())
    dof = counts.size - 1
    return stat, float(stats.chi2.ppf(1 - FALSE_FAILURE, dof)), dof


@pytest.mark.parametrize("pairing", ["adjacent elements", "consecutive draws", "across a block"])
def test_pairs_are_independent(pairing):
    """Joint 16 x 16 histogram of pairs of uniforms that differ only in one counter word: adjacent
    element indices (subsequence), consecutive draws of one element (word of a block), and draw 3 vs
    draw 4 (offset word). Chi-square with 255 dof at false-failure rate 1e-6."""
    n = 1 << 16
    u = ue.philox_uniform(torch.arange(n + 1), 8, seed=31337, offset=2**32 - 1).numpy()
    if pairing == "adjacent elements":
        a, b = u[:-1, 0], u[1:, 0]
    elif pairing == "consecutive draws":
        a, b = u[:n, 0], u[:n, 1]
    else:
        a, b = u[:n, 3], u[:n, 4]
    cells = (a * 16).astype(np.int64) * 16 + (b * 16).astype(np.int64)
    stat, crit, _ = _chi2_uniform(np.bincount(cells, minlength=256))
    assert stat < crit, (stat, crit)


def test_every_bit_is_fair():
    """Each of the 32 bit positions of 2^18 words is 1 with frequency 1/2: two-sided binomial test
    per bit at 1e-6 / 32 (Bonferroni), so the whole test fails by chance with probability <= 1e-6."""
    words = unsigned_words(ue.philox_bits(torch.arange(1 << 16), 4, seed=99, offset=5)).reshape(-1)
    n = words.numel()
    for bit in range(32):
        ones = int(((words >> bit) & 1).sum())
        assert stats.binomtest(ones, n, 0.5).pvalue > FALSE_FAILURE / 32, (bit, ones, n)


@pytest.mark.parametrize("p", [0.001, 0.3, 0.5, 0.97])
def test_bernoulli_frequency(p):
    """Bernoulli(p) over 2^18 draws: two-sided exact binomial test at false-failure rate 1e-6."""
    b = ue.philox_bernoulli(torch.arange(1 << 16), 4, p, seed=4242, offset=2**33)
    hits = int(b.sum())
    assert stats.binomtest(hits, b.numel(), p).pvalue > FALSE_FAILURE, (hits, b.numel() * p)
