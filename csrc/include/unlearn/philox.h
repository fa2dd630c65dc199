// The RNG contract of DESIGN section 3, shared by the CPU and CUDA kernels.
//
// Philox4x32 with 10 rounds (Salmon et al., SC'11). Key = the 64-bit seed as (low, high) words;
// counter = (offset low, offset high, subsequence low, subsequence high), where the subsequence is
// the global element index in a tensor list and the offset counts blocks of four 32-bit outputs.
// Draw j of element i is word (j mod 4) of the block at counter (offset + j / 4, i).
#pragma once

#include <cmath>
#include <cstdint>

#include "unlearn/macros.h"

namespace unlearn {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;  // round multipliers
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // key schedule (golden ratio, sqrt(3) - 1)
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

struct PhiloxBlock {
  uint32_t w[4];
};

UE_HOST_DEVICE uint32_t mul_hi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

// One Philox4x32-10 block. Written branch-free over plain uint32 so that the CPU walker's loop over
// lanes auto-vectorizes (vpmuludq) and nvcc emits mul.hi.
UE_HOST_DEVICE PhiloxBlock philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                         uint32_t k0, uint32_t k1) {
  // Fully unrolled, each compiler told in its own words: a bare `#pragma unroll` is nvcc's (GCC
  // ignores it, with a warning), `#pragma GCC unroll` is GCC's (nvcc warns on it). nvcc's host pass
  // gets neither (its host compiler sees every pragma nvcc's front end accepted).
#if defined(__CUDA_ARCH__)
#pragma unroll
#elif !defined(__CUDACC__)
#pragma GCC unroll 10
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = mul_hi32(kPhiloxM0, c0);
    const uint32_t lo0 = kPhiloxM0 * c0;
    const uint32_t hi1 = mul_hi32(kPhiloxM1, c2);
    const uint32_t lo1 = kPhiloxM1 * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return PhiloxBlock{{c0, c1, c2, c3}};
}

// The block holding draws 4*block_index .. 4*block_index + 3 of `element`.
UE_HOST_DEVICE PhiloxBlock philox_block_for(uint64_t seed, uint64_t offset, uint64_t block_index,
                                            uint64_t element) {
  const uint64_t counter = offset + block_index;
  return philox4x32_10(static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32),
                       static_cast<uint32_t>(element), static_cast<uint32_t>(element >> 32),
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// --- From 32-bit words to uniforms and Bernoulli draws -------------------------------------------
// The uniform of word x is u = ((x >> 8) + 0.5) * 2^-24, exact in float64 and strictly inside (0, 1).
// Kernels never form u: they compare the 24-bit integer k = x >> 8 with an integer threshold that
// gives the same answer as comparing the exact u with a probability p.

constexpr uint32_t kUniformLevels = 1u << 24;

UE_HOST_DEVICE uint32_t uniform_level(uint32_t word) { return word >> 8; }

UE_HOST_DEVICE double uniform_from_word(uint32_t word) {
  return (static_cast<double>(word >> 8) + 0.5) * 0x1p-24;
}

// Number of levels k in [0, 2^24) with (k + 0.5) * 2^-24 < p, i.e. u < p  <=>  k < threshold.
// (k + 0.5) 2^-24 < p  <=>  2k + 1 < p 2^25  <=>  k < (p 2^25 - 1) / 2, so the count is
// ceil((p 2^25 - 1) / 2) clamped to [0, 2^24]. Every step is exact in float64 for p in [0, 1].
// The clamp is two selects rather than branches, so lane loops over it vectorize (the CPU `mc`
// kernel's thresholds; on x86 the selects are maxpd and minpd): p <= 0 gives t <= 0 and NaN fails
// the compare, both give 0; p >= 1 gives t >= 2^24 (p = +inf: +inf), clamped to 2^24.
UE_HOST_DEVICE uint32_t levels_below(double p) {
  const double t = ceil((p * 0x1p25 - 1.0) * 0.5);
  const double levels = static_cast<double>(kUniformLevels);
  const double at_least_0 = t > 0.0 ? t : 0.0;
  const double clamped = at_least_0 < levels ? at_least_0 : levels;
  return static_cast<uint32_t>(static_cast<int32_t>(clamped));  // exact: an integer in [0, 2^24]
}

}  // namespace unlearn
