"""RNG contract (DESIGN section 3): Philox4x32-10 known answers; kernel bits == reference bits."""
import math

import pytest
import torch

import unlearn_ext as ue
from unlearn_ext import reference
from conftest import devices

KNOWN_ANSWERS = [  # Random123 Philox4x32-10 known-answer vectors, as given in DESIGN section 3
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_reference_known_answers(counter, key, expected):
    words = reference.philox4x32_10(counter, key)
    assert tuple(int(w) for w in words) == expected


@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_kernel_known_answers(counter, key, expected):
    # counter = (offset lo, offset hi, element lo, element hi); key = seed (lo, hi)
    offset = counter[0] | (counter[1] << 32)
    element = counter[2] | (counter[3] << 32)
    seed = key[0] | (key[1] << 32)
    signed_element = element - 2**64 if element >= 2**63 else element
    bits = ue.philox_bits(torch.tensor([signed_element]), 4, seed=seed, offset=offset)
    assert [int(b) & 0xFFFFFFFF for b in bits[0]] == list(expected)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("seed,offset", [(0, 0), (123, 7), (2**63 + 5, 2**32 - 2), (2**64 - 1, 2**64 - 1)])
@pytest.mark.parametrize("draws", [0, 1, 5, 8])
def test_words_uniforms_bernoulli_match_reference(device, seed, offset, draws):
    idx = torch.cat([torch.arange(0, 300), torch.tensor([2**32 - 1, 2**32, 2**40 + 3, -1])]).to(device)
    bits = ue.philox_bits(idx, draws, seed=seed, offset=offset)
    s = seed - 2**64 if seed >= 2**63 else seed
    o = offset - 2**64 if offset >= 2**63 else offset
    assert torch.equal(bits.cpu(), reference.philox_bits(idx.cpu(), draws, s, o))
    u = ue.philox_uniform(idx, draws, seed=seed, offset=offset)
    assert torch.equal(u.cpu(), reference.philox_uniform(idx.cpu(), draws, s, o))
    if draws:
        assert float(u.min()) > 0.0 and float(u.max()) < 1.0
    for p in (0.0, 1e-9, 0.3, 0.5, 1 - 1e-9, 1.0):
        b = ue.philox_bernoulli(idx, draws, p, seed=seed, offset=offset)
        assert torch.equal(b.cpu(), u.cpu() < p)


def test_empty_index():
    out = ue.philox_bits(torch.empty(0, dtype=torch.int64), 3, seed=1)
    assert out.shape == (0, 3)


def test_uniformity_chi_square():
    # 64 bins, 2^18 draws; chi-square with 63 dof: P(stat > 120) ~ 1.3e-5 (false-failure rate).
    u = ue.philox_uniform(torch.arange(1 << 16), 4, seed=2024, offset=0).reshape(-1)
    counts = torch.histc(u, bins=64, min=0.0, max=1.0)
    expected = u.numel() / 64
    stat = float(((counts - expected) ** 2 / expected).sum())
    assert stat < 120, stat


def test_offsets_give_fresh_streams():
    idx = torch.arange(1000)
    a = ue.philox_bits(idx, 4, seed=1, offset=0)
    b = ue.philox_bits(idx, 4, seed=1, offset=1)
    c = ue.philox_bits(idx, 8, seed=1, offset=0)
    assert torch.equal(c[:, 4:], b)  # draw j of offset 0 = draw j-4 of offset 1
    assert (a != b).float().mean() > 0.99
