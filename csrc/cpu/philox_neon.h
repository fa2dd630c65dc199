// NEON transcription of Philox4x32-10 (unlearn/philox.h) for aarch64: 4 streams per register, one
// stream per 32-bit lane. NEON multiplies 2 lanes at a time into 64-bit products (vmull_u32 on the low
// half, vmull_high_u32 on the high half); one unzip then gathers the 4 high words and another the 4
// low words, back in stream order. A round costs 2 x (2 multiplies + 2 unzips) + 4 xors per 4 streams.
//
// Free of torch: the standalone bit-identity test (tests/native/neon_bit_identity.cpp, run under
// qemu-aarch64 by scripts/check_aarch64_build.sh) calls these functions on raw buffers and compares
// them with the scalar Philox word for word. Include it only on aarch64 (the neon copy of a kernel
// file, or that test).
#pragma once

#include <arm_neon.h>

#include <cstdint>

#include "unlearn/philox.h"

namespace unlearn {
namespace cpu {

// The 64-bit products m * x of 4 lanes, as their high and low 32-bit words in lane order.
struct WideProducts4 {
  uint32x4_t hi, lo;
};

static inline WideProducts4 mul_wide_neon(uint32x4_t x, uint32x4_t m) {
  const uint32x4_t first = vreinterpretq_u32_u64(vmull_u32(vget_low_u32(x), vget_low_u32(m)));  // lanes 0, 1
  const uint32x4_t second = vreinterpretq_u32_u64(vmull_high_u32(x, m));                       // lanes 2, 3
  // Each 64-bit product is (low word, high word) in memory order (little-endian): the odd 32-bit
  // elements are the high words, the even ones the low words.
  return WideProducts4{vuzp2q_u32(first, second), vuzp1q_u32(first, second)};
}

// All 10 rounds on R independent register sets (words w[i][0..3] of 4 streams each), from the seed's
// key words k0, k1. The sets advance round by round side by side, so that the multiplies of one set
// overlap with the others' (a multiply's latency is several cycles on Neoverse and Apple cores).
template <int R>
static inline void philox_rounds_neon(uint32x4_t (&w)[R][4], uint32_t k0, uint32_t k1) {
  const uint32x4_t m0 = vdupq_n_u32(kPhiloxM0), m1 = vdupq_n_u32(kPhiloxM1);
  for (int round = 0; round < 10; ++round) {
    const uint32x4_t key0 = vdupq_n_u32(k0), key1 = vdupq_n_u32(k1);
    for (int i = 0; i < R; ++i) {
      const WideProducts4 p0 = mul_wide_neon(w[i][0], m0);
      const WideProducts4 p1 = mul_wide_neon(w[i][2], m1);
      w[i][0] = veorq_u32(veorq_u32(p1.hi, w[i][1]), key0);
      w[i][2] = veorq_u32(veorq_u32(p0.hi, w[i][3]), key1);
      w[i][1] = p1.lo;
      w[i][3] = p0.lo;
    }
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

// 4 Philox4x32-10 blocks: counter words c[0..3] and key (k0, k1) per lane in, output words out.
static inline void philox4x32_10_neon(const uint32x4_t (&c)[4], uint32_t k0, uint32_t k1, uint32x4_t (&out)[4]) {
  uint32x4_t w[1][4] = {{c[0], c[1], c[2], c[3]}};
  philox_rounds_neon<1>(w, k0, k1);
  for (int q = 0; q < 4; ++q) out[q] = w[0][q];
}

// The 64-bit element indices element0 .. element0 + 3 as low and high 32-bit words: the high word
// gains a carry in the lanes where the low word wrapped (a compare's all-ones lane is -1).
static inline void element_words_neon(uint64_t element0, uint32x4_t& lo, uint32x4_t& hi) {
  static const uint32_t kStep[4] = {0, 1, 2, 3};
  const uint32x4_t base_lo = vdupq_n_u32(static_cast<uint32_t>(element0));
  lo = vaddq_u32(base_lo, vld1q_u32(kStep));
  hi = vsubq_u32(vdupq_n_u32(static_cast<uint32_t>(element0 >> 32)), vcltq_u32(lo, base_lo));
}

// The random selection keys of unlearn/select.h (random_key: the complement of word 0 of the block
// at counter `offset`, subsequence = the element) of elements element0 .. element0 + n - 1 into
// out, for the largest multiple of 4 elements <= n; returns how many were written (the caller
// finishes the rest with random_key).
static inline int64_t random_keys_neon(uint64_t seed, uint64_t offset, int64_t n, uint64_t element0, uint32_t* out) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const uint32x4_t ctr_lo = vdupq_n_u32(static_cast<uint32_t>(offset));
  const uint32x4_t ctr_hi = vdupq_n_u32(static_cast<uint32_t>(offset >> 32));
  constexpr int kSets = 4;  // 16 elements per step: 4 independent multiply chains
  int64_t j = 0;
  for (; j + 4 * kSets <= n; j += 4 * kSets) {
    uint32x4_t w[kSets][4];
    for (int i = 0; i < kSets; ++i) {
      w[i][0] = ctr_lo;
      w[i][1] = ctr_hi;
      element_words_neon(element0 + static_cast<uint64_t>(j + 4 * i), w[i][2], w[i][3]);
    }
    philox_rounds_neon<kSets>(w, k0, k1);
    for (int i = 0; i < kSets; ++i) vst1q_u32(out + j + 4 * i, vmvnq_u32(w[i][0]));
  }
  for (; j + 4 <= n; j += 4) {
    uint32x4_t w[1][4];
    w[0][0] = ctr_lo;
    w[0][1] = ctr_hi;
    element_words_neon(element0 + static_cast<uint64_t>(j), w[0][2], w[0][3]);
    philox_rounds_neon<1>(w, k0, k1);
    vst1q_u32(out + j, vmvnq_u32(w[0][0]));
  }
  return j;
}

}  // namespace cpu
}  // namespace unlearn
