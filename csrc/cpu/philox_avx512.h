// AVX-512 Philox: 16 elements per register, one Philox stream per lane, for the `mc` draw loop
// (smoothing_mc_avx512.cpp) and the Random-k keys (select_keys.h). The arithmetic is exactly
// philox4x32_10 of the shared headers (tests compare the results bit for bit with the reference);
// it exists because GCC vectorizes the scalar form with 64-bit multiplies (vpmullq), which measured
// ~6x slower than the vpmuludq forms below.
//
// Include it only where AVX-512 is enabled for the code that follows (#pragma GCC target: the
// AVX-512 copy of a kernel file, isa_target.h, or smoothing_mc_avx512.cpp).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "unlearn/philox.h"

namespace unlearn {
namespace cpu {

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

// Word 0 of the Philox blocks (counter offset, subsequence element0 + j) for the 16 * I consecutive
// elements j = 0 .. 16 I - 1, into out[0 .. 16 I): the random selection keys of unlearn/select.h
// (random_key = ~word 0) 16 lanes at a time, I independent blocks interleaved (one block's 10 rounds
// are a serial chain of multiplies, so several chains in flight keep the multiplier busy).
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

// ---- 64-bit lane layout: 8 streams per register, no blends ----------------------------------------
// Each stream's 32-bit word sits in the low half of a 64-bit lane. vpmuludq reads only low halves,
// so the upper halves may hold anything until the words are packed at the end: the product's low
// half is already lo, and hi is one shift away. A round costs 2 vpmuludq + 2 shifts + 2 three-way
// xors per 8 streams (12 ops per 16 streams against 16 for mulhilo_avx512 above).

// The first round sees the element only through counter words 2 and 3 and the block only through
// words 0 and 1, so both of its multiplies are hoisted: the element part once per register of
// elements, the block part as one scalar multiply per block.
struct PhiloxFirstRound64 {
  __m512i x0;   // hi(M1 * element_lo) ^ k0
  __m512i lo1;  // M1 * element_lo (low half)
  __m512i y2;   // element_hi ^ k1
};

// `element` holds 8 global element indices as 64-bit lanes.
static inline PhiloxFirstRound64 philox_first_round64(__m512i element, uint32_t k0, uint32_t k1) {
  const __m512i prod = _mm512_mul_epu32(element, _mm512_set1_epi64(kPhiloxM1));
  return PhiloxFirstRound64{_mm512_xor_si512(_mm512_srli_epi64(prod, 32), _mm512_set1_epi32(static_cast<int>(k0))),
                            prod,
                            _mm512_xor_si512(_mm512_srli_epi64(element, 32), _mm512_set1_epi32(static_cast<int>(k1)))};
}

// Words after round 1 for the block at Philox counter `ctr` (offset + block index).
static inline void philox_after_first_round64(const PhiloxFirstRound64& f, uint64_t ctr, __m512i (&w)[4]) {
  const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * static_cast<uint32_t>(ctr);
  w[0] = _mm512_xor_si512(f.x0, _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(ctr >> 32))));
  w[1] = f.lo1;
  w[2] = _mm512_xor_si512(f.y2, _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(p0 >> 32))));
  w[3] = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(p0)));
}

// Rounds 2..10 on R independent register sets (several multiply chains in flight); k0, k1 are the
// round-1 key words (the seed).
template <int R>
static inline void philox_rounds_2_to_10_64(__m512i (&w)[R][4], uint32_t k0, uint32_t k1) {
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0), m1 = _mm512_set1_epi64(kPhiloxM1);
  for (int round = 1; round < 10; ++round) {
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
    const __m512i key0 = _mm512_set1_epi32(static_cast<int>(k0));
    const __m512i key1 = _mm512_set1_epi32(static_cast<int>(k1));
    for (int i = 0; i < R; ++i) {
      const __m512i p0 = _mm512_mul_epu32(w[i][0], m0);
      const __m512i p1 = _mm512_mul_epu32(w[i][2], m1);
      w[i][0] = _mm512_ternarylogic_epi32(_mm512_srli_epi64(p1, 32), w[i][1], key0, 0x96);
      w[i][2] = _mm512_ternarylogic_epi32(_mm512_srli_epi64(p0, 32), w[i][3], key1, 0x96);
      w[i][1] = p1;
      w[i][3] = p0;
    }
  }
}

// The low halves of two 64-bit-layout registers as 16 32-bit lanes: a's 8 streams, then b's.
static inline __m512i pack_low_halves64(__m512i a, __m512i b) {
  const __m512i idx = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  return _mm512_permutex2var_epi32(a, idx, b);
}

}  // namespace cpu
}  // namespace unlearn
