// AVX2 transcription of Philox4x32-10 (unlearn/philox.h), 4 streams per register in the 64-bit lane
// layout of philox_avx512.h: each stream's 32-bit word sits in the low half of a 64-bit lane, where
// vpmuludq reads it, so a round needs no blends (2 vpmuludq + 2 shifts + 4 xors per 4 streams; AVX2
// has no three-way xor). Tests compare the words bit for bit with the scalar Philox.
//
// Include it only where AVX2 is enabled for the code that follows (#pragma GCC target: the AVX2 copy
// of a kernel file, or isa_target.h). The mc span (smoothing_mc_avx2.cpp) has a layout of its own,
// tuned for its draw loop.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "unlearn/philox.h"

namespace unlearn {
namespace cpu {

// Round 1 sees the element only through counter words 2 and 3 and the block only through words 0
// and 1, so its multiplies are hoisted: the element part once per register, the block part as one
// scalar multiply per block (as philox_first_round64 does for AVX-512).
struct PhiloxFirstRound4 {
  __m256i x0;   // hi(M1 * element_lo) ^ k0
  __m256i lo1;  // M1 * element_lo (low half)
  __m256i y2;   // element_hi ^ k1
};

// `element` holds 4 global element indices as 64-bit lanes.
static inline PhiloxFirstRound4 philox_first_round_avx2(__m256i element, uint32_t k0, uint32_t k1) {
  const __m256i prod = _mm256_mul_epu32(element, _mm256_set1_epi64x(kPhiloxM1));
  return PhiloxFirstRound4{_mm256_xor_si256(_mm256_srli_epi64(prod, 32), _mm256_set1_epi32(static_cast<int>(k0))),
                           prod,
                           _mm256_xor_si256(_mm256_srli_epi64(element, 32), _mm256_set1_epi32(static_cast<int>(k1)))};
}

// Words after round 1 for the block at Philox counter `ctr`.
static inline void philox_after_first_round_avx2(const PhiloxFirstRound4& f, uint64_t ctr, __m256i (&w)[4]) {
  const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * static_cast<uint32_t>(ctr);
  w[0] = _mm256_xor_si256(f.x0, _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(ctr >> 32))));
  w[1] = f.lo1;
  w[2] = _mm256_xor_si256(f.y2, _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(p0 >> 32))));
  w[3] = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(p0)));
}

// Rounds 2..10 on R independent register sets; k0, k1 are the round-1 key words (the seed).
template <int R>
static inline void philox_rounds_2_to_10_avx2(__m256i (&w)[R][4], uint32_t k0, uint32_t k1) {
  const __m256i m0 = _mm256_set1_epi64x(kPhiloxM0), m1 = _mm256_set1_epi64x(kPhiloxM1);
  for (int round = 1; round < 10; ++round) {
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
    const __m256i key0 = _mm256_set1_epi32(static_cast<int>(k0));
    const __m256i key1 = _mm256_set1_epi32(static_cast<int>(k1));
    for (int i = 0; i < R; ++i) {
      const __m256i p0 = _mm256_mul_epu32(w[i][0], m0);
      const __m256i p1 = _mm256_mul_epu32(w[i][2], m1);
      w[i][0] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p1, 32), w[i][1]), key0);
      w[i][2] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p0, 32), w[i][3]), key1);
      w[i][1] = p1;
      w[i][3] = p0;
    }
  }
}

// The low halves of two 64-bit-layout registers as 8 32-bit lanes: a's 4 streams, then b's.
static inline __m256i pack_low_halves_avx2(__m256i a, __m256i b) {
  const __m256 mixed = _mm256_shuffle_ps(_mm256_castsi256_ps(a), _mm256_castsi256_ps(b), _MM_SHUFFLE(2, 0, 2, 0));
  return _mm256_permute4x64_epi64(_mm256_castps_si256(mixed), _MM_SHUFFLE(3, 1, 2, 0));  // a0 a1 a2 a3 b0 b1 b2 b3
}

// 8 consecutive 64-bit element indices element0 .. element0 + 7 as two 4-lane registers.
static inline void element_indices_avx2(uint64_t element0, __m256i& first, __m256i& second) {
  first = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<long long>(element0)), _mm256_setr_epi64x(0, 1, 2, 3));
  second = _mm256_add_epi64(first, _mm256_set1_epi64x(4));
}

// Word 0 of the Philox blocks (counter `offset`, subsequence element0 + j) for the 8 consecutive
// elements j = 0..7: the random selection keys of unlearn/select.h (random_key = ~word 0) before the
// complement, 8 at a time.
static inline __m256i philox_word0_avx2(uint64_t seed, uint64_t offset, uint64_t element0) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  __m256i first, second;
  element_indices_avx2(element0, first, second);
  __m256i w[2][4];
  philox_after_first_round_avx2(philox_first_round_avx2(first, k0, k1), offset, w[0]);
  philox_after_first_round_avx2(philox_first_round_avx2(second, k0, k1), offset, w[1]);
  philox_rounds_2_to_10_avx2<2>(w, k0, k1);
  return pack_low_halves_avx2(w[0][0], w[1][0]);
}

}  // namespace cpu
}  // namespace unlearn
