// AVX-512 transcription of the Monte-Carlo draw loop: 16 elements per register, one Philox stream
// per lane. The arithmetic is exactly philox4x32_10 / draw_is_negative / draw_is_positive of the
// shared headers (tests compare the results bit for bit with the reference); it exists because
// GCC vectorizes the scalar form with 64-bit multiplies (vpmullq) and spills the counters, which
// measured ~6x slower than the even/odd vpmuludq form below.
#pragma once

#if defined(__AVX512F__)
#include <immintrin.h>

#include <cstdint>

#include "unlearn/philox.h"

namespace unlearn {
namespace cpu {

struct Avx512Counts {
  __m512i sel_neg, sel_pos, est_neg, est_pos;
};

// (hi, lo) 32-bit halves of a * m per lane, from two vpmuludq (even and odd lanes).
static inline void mulhilo_avx512(__m512i a, __m512i m, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

// Philox4x32-10 on I independent counter sets w[i][0..3] (same key), updated in place.
template <int I>
static inline void philox_avx512_interleaved(__m512i (&w)[I][4], uint32_t k0, uint32_t k1) {
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0), m1 = _mm512_set1_epi64(kPhiloxM1);
  for (int round = 0; round < 10; ++round) {
    const __m512i key0 = _mm512_set1_epi32(static_cast<int>(k0));
    const __m512i key1 = _mm512_set1_epi32(static_cast<int>(k1));
    for (int i = 0; i < I; ++i) {
      __m512i hi0, lo0, hi1, lo1;
      mulhilo_avx512(w[i][0], m0, hi0, lo0);
      mulhilo_avx512(w[i][2], m1, hi1, lo1);
      w[i][0] = _mm512_ternarylogic_epi32(hi1, w[i][1], key0, 0x96);  // three-way xor
      w[i][2] = _mm512_ternarylogic_epi32(hi0, w[i][3], key1, 0x96);
      w[i][1] = lo1;
      w[i][3] = lo0;
    }
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

// Adds one word per lane to (neg, pos): k = word >> 8; -1 if k < neg_levels; +1 if
// k >= max(pos_start, neg_levels) (the "not -1" condition folded into the threshold).
static inline void count_word_avx512(__m512i word, __m512i neg_levels, __m512i pos_from, __m512i& neg,
                                     __m512i& pos) {
  const __m512i k = _mm512_srli_epi32(word, 8);
  const __m512i one = _mm512_set1_epi32(1);
  neg = _mm512_mask_add_epi32(neg, _mm512_cmplt_epi32_mask(k, neg_levels), neg, one);
  pos = _mm512_mask_add_epi32(pos, _mm512_cmpge_epi32_mask(k, pos_from), pos, one);
}

// Counts for 16 consecutive elements whose global indices start at element0.
static inline Avx512Counts mc_counts_avx512(const int32_t* neg_levels_in, const int32_t* pos_start_in,
                                            uint64_t element0, uint64_t seed, uint64_t offset,
                                            int64_t n0, int64_t n) {
  const __m512i neg_levels = _mm512_loadu_si512(neg_levels_in);
  const __m512i pos_from = _mm512_max_epi32(_mm512_loadu_si512(pos_start_in), neg_levels);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  // 64-bit element indices element0 + lane, split into 32-bit words (carry into the high word).
  const uint32_t base_lo = static_cast<uint32_t>(element0);
  const __m512i e_lo = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(base_lo)), lane);
  const __mmask16 carry = _mm512_cmplt_epu32_mask(e_lo, _mm512_set1_epi32(static_cast<int>(base_lo)));
  const __m512i e_hi = _mm512_mask_add_epi32(_mm512_set1_epi32(static_cast<int>(element0 >> 32)), carry,
                                             _mm512_set1_epi32(static_cast<int>(element0 >> 32)),
                                             _mm512_set1_epi32(1));
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  Avx512Counts c{_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                 _mm512_setzero_si512()};
  const int64_t draws = n0 + n;
  // kInterleave independent blocks per pass: one block's 10 rounds are a serial chain of
  // multiplies, so several chains in flight keep the multiplier busy.
  constexpr int kInterleave = 4;
  for (int64_t b0 = 0; 4 * b0 < draws; b0 += kInterleave) {
    __m512i w[kInterleave][4];
    for (int i = 0; i < kInterleave; ++i) {
      const uint64_t ctr = offset + static_cast<uint64_t>(b0 + i);
      w[i][0] = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(ctr)));
      w[i][1] = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(ctr >> 32)));
      w[i][2] = e_lo;
      w[i][3] = e_hi;
    }
    philox_avx512_interleaved<kInterleave>(w, k0, k1);
    for (int i = 0; i < kInterleave; ++i) {
      for (int q = 0; q < 4; ++q) {
        const int64_t j = 4 * (b0 + i) + q;
        if (j < n0) count_word_avx512(w[i][q], neg_levels, pos_from, c.sel_neg, c.sel_pos);
        else if (j < draws) count_word_avx512(w[i][q], neg_levels, pos_from, c.est_neg, c.est_pos);
      }
    }
  }
  return c;
}

// Word 0 of the Philox blocks (counter offset, subsequence element0 + j) for the 16 * I consecutive
// elements j = 0 .. 16 I - 1, into out[0 .. 16 I): the random selection keys of unlearn/select.h
// (random_key = ~word 0) 16 lanes at a time, I independent blocks interleaved as in mc_counts_avx512.
template <int I>
static inline void philox_word0_avx512(uint64_t seed, uint64_t offset, uint64_t element0, uint32_t* out) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512i w[I][4];
  for (int i = 0; i < I; ++i) {
    const uint64_t e0 = element0 + 16 * static_cast<uint64_t>(i);
    const __m512i base_lo = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(e0)));
    const __m512i base_hi = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(e0 >> 32)));
    const __m512i e_lo = _mm512_add_epi32(base_lo, lane);
    const __mmask16 carry = _mm512_cmplt_epu32_mask(e_lo, base_lo);
    w[i][0] = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset)));
    w[i][1] = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset >> 32)));
    w[i][2] = e_lo;
    w[i][3] = _mm512_mask_add_epi32(base_hi, carry, base_hi, _mm512_set1_epi32(1));
  }
  philox_avx512_interleaved<I>(w, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  for (int i = 0; i < I; ++i) _mm512_storeu_si512(out + 16 * i, w[i][0]);
}

}  // namespace cpu
}  // namespace unlearn
#endif  // __AVX512F__
