// AVX-512 path of the CPU `mc` kernel (interface and contract: mc_kernel.h). Everything per element
// after Phi is vectorized, 16 elements at a time: integer draw thresholds from the probabilities,
// the n0 + n Philox draws and their class counts, CERTIFY, the stores and the statistics.
//
// This file enables AVX-512 for its own functions only (#pragma GCC target), so a portable build
// (no -march=native) still contains this path, and the AVX-512 copy of smoothing_cpu.cpp calls it
// where the CPU has AVX-512 (isa.h). Everything included before the pragma keeps the build's
// default target: inline functions of shared headers must not be emitted here with AVX-512
// instructions, or the linker could hand those copies to code that runs on CPUs without it.
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "mc_kernel.h"
#include "unlearn/philox.h"
#include "isa.h"

#if UNLEARN_X86_VARIANTS

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl")
#include <immintrin.h>

#include "philox_avx512.h"

namespace unlearn {
namespace cpu {
namespace {

constexpr int kLanes = 16;
// Philox blocks computed side by side for one group of 16 elements: each block is two registers
// (8 elements each) whose 9 vector rounds are serial multiply chains; 2 blocks = 4 chains in
// flight, enough to cover vpmuludq's latency without spilling the 32 registers.
constexpr int kBlocksInFlight = 2;

// levels_below (unlearn/philox.h) for 16 float probabilities: ceil((p 2^25 - 1) / 2) in float64,
// clamped to [0, 2^24]; 0 for p <= 0 or NaN, 2^24 for p >= 1. Every step is exact, as in the
// scalar form.
inline __m256i levels_below8(__m256 p_f) {
  const __m512d p = _mm512_cvtps_pd(p_f);
  const __m512d scaled = _mm512_mul_pd(_mm512_sub_pd(_mm512_mul_pd(p, _mm512_set1_pd(0x1p25)), _mm512_set1_pd(1.0)),
                                       _mm512_set1_pd(0.5));
  __m512d t = _mm512_roundscale_pd(scaled, _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC);
  t = _mm512_min_pd(_mm512_max_pd(t, _mm512_setzero_pd()), _mm512_set1_pd(static_cast<double>(kUniformLevels)));
  const __mmask8 positive = _mm512_cmp_pd_mask(p, _mm512_setzero_pd(), _CMP_GT_OQ);  // false for NaN
  const __mmask8 one = _mm512_cmp_pd_mask(p, _mm512_set1_pd(1.0), _CMP_GE_OQ);
  __m256i levels = _mm512_maskz_cvttpd_epi32(positive, t);
  return _mm256_mask_blend_epi32(one, levels, _mm256_set1_epi32(static_cast<int>(kUniformLevels)));
}

inline __m512i levels_below16(__m512 p) {
  const __m256i lo = levels_below8(_mm512_castps512_ps256(p));
  const __m256i hi = levels_below8(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(p), 1)));
  return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

struct Counts16 {
  __m512i sel_neg, sel_pos, est_neg, est_pos;
};

// Class counts of the n0 selection and n estimation draws of 16 consecutive elements (element0 is
// the first one's global index). Thresholds are compared with whole 32-bit words: for a level count
// L < 2^24, (word >> 8) < L <=> word < L * 256 (unsigned), which saves a shift per word; L = 2^24
// (every draw below) wraps to 0 and is fixed after the loop.
inline Counts16 count_draws16(__m512i neg_levels, __m512i pos_from, uint64_t element0, const McDrawParams& p) {
  const __m512i neg_words = _mm512_slli_epi32(neg_levels, 8);  // class -1 iff word <  neg_words
  const __m512i pos_words = _mm512_slli_epi32(pos_from, 8);    // class +1 iff word >= pos_words
  const __m512i one = _mm512_set1_epi32(1);
  const uint32_t k0 = static_cast<uint32_t>(p.seed), k1 = static_cast<uint32_t>(p.seed >> 32);
  const __m512i idx8 = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  const __m512i first = _mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(element0)), idx8);
  const __m512i second = _mm512_add_epi64(first, _mm512_set1_epi64(8));
  const PhiloxFirstRound64 f[2] = {philox_first_round64(first, k0, k1), philox_first_round64(second, k0, k1)};
  Counts16 c{_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
  const int64_t n0 = p.n0, draws = int64_t(p.n0) + p.n;
  for (int64_t b0 = 0; 4 * b0 < draws; b0 += kBlocksInFlight) {
    __m512i w[2 * kBlocksInFlight][4];
    for (int i = 0; i < kBlocksInFlight; ++i) {
      const uint64_t ctr = p.offset + static_cast<uint64_t>(b0 + i);
      philox_after_first_round64(f[0], ctr, w[2 * i]);
      philox_after_first_round64(f[1], ctr, w[2 * i + 1]);
    }
    philox_rounds_2_to_10_64<2 * kBlocksInFlight>(w, k0, k1);
    for (int i = 0; i < kBlocksInFlight; ++i) {
      for (int q = 0; q < 4; ++q) {
        const int64_t j = 4 * (b0 + i) + q;  // draw index of this word
        if (j >= draws) break;
        const __m512i word = pack_low_halves64(w[2 * i][q], w[2 * i + 1][q]);
        const __mmask16 neg = _mm512_cmplt_epu32_mask(word, neg_words);
        const __mmask16 pos = _mm512_cmpge_epu32_mask(word, pos_words);
        if (j < n0) {
          c.sel_neg = _mm512_mask_add_epi32(c.sel_neg, neg, c.sel_neg, one);
          c.sel_pos = _mm512_mask_add_epi32(c.sel_pos, pos, c.sel_pos, one);
        } else {
          c.est_neg = _mm512_mask_add_epi32(c.est_neg, neg, c.est_neg, one);
          c.est_pos = _mm512_mask_add_epi32(c.est_pos, pos, c.est_pos, one);
        }
      }
    }
  }
  const __m512i all = _mm512_set1_epi32(static_cast<int>(kUniformLevels));
  const __mmask16 every_neg = _mm512_cmpeq_epi32_mask(neg_levels, all);  // neg_words wrapped to 0
  const __mmask16 no_pos = _mm512_cmpeq_epi32_mask(pos_from, all);      // pos_words wrapped to 0
  c.sel_neg = _mm512_mask_mov_epi32(c.sel_neg, every_neg, _mm512_set1_epi32(p.n0));
  c.est_neg = _mm512_mask_mov_epi32(c.est_neg, every_neg, _mm512_set1_epi32(p.n));
  c.sel_pos = _mm512_maskz_mov_epi32(static_cast<__mmask16>(~no_pos), c.sel_pos);
  c.est_pos = _mm512_maskz_mov_epi32(static_cast<__mmask16>(~no_pos), c.est_pos);
  return c;
}

}  // namespace

void mc_span_avx512(const float* p_neg, const float* p_pos, int64_t count, uint64_t global_begin,
                    const McDrawParams& p, int8_t* codes, float* radii, McSpanStats& stats) {
  const __m512i zero = _mm512_setzero_si512();
  const __m512i n0v = _mm512_set1_epi32(p.n0), nv = _mm512_set1_epi32(p.n);
  const __m512 sigma = _mm512_set1_ps(p.sigma), shrink = _mm512_set1_ps(1.0f - 0x1p-22f);
  const __m512 below_thr = _mm512_set1_ps(p.below_threshold);
  __m512i min_bits = _mm512_set1_epi32(stats.min_radius_bits);
  int64_t abstained = 0, nonfinite = 0, below = 0;
  for (int64_t base = 0; base < count; base += kLanes) {
    const int64_t rest = count - base;
    const __mmask16 valid = rest >= kLanes ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << rest) - 1u);
    // Thresholds (mc_thresholds in unlearn/smoothing.h): padding lanes read p = 0, count nothing
    // and are masked out of the stores and statistics below.
    const __m512 pn = _mm512_maskz_loadu_ps(valid, p_neg + base);
    const __m512 pp = _mm512_maskz_loadu_ps(valid, p_pos + base);
    const __mmask16 finite = _mm512_cmp_ps_mask(pn, pn, _CMP_ORD_Q) & valid;
    const __m512i neg_levels = levels_below16(pn);
    const __m512i pos_start = _mm512_sub_epi32(_mm512_set1_epi32(static_cast<int>(kUniformLevels)), levels_below16(pp));
    // +1 needs k >= pos_start and "not -1" (k >= neg_levels): one threshold, the larger.
    const __m512i pos_from = _mm512_max_epi32(pos_start, neg_levels);
    const Counts16 c = count_draws16(neg_levels, pos_from, global_begin + static_cast<uint64_t>(base), p);

    // CERTIFY (certify_from_counts): c_A from selection counts (ties: 0, then +1, then -1), k_A from
    // the estimation counts, the table entry at k_A, abstention where it is not positive.
    const __m512i zero_sel = _mm512_sub_epi32(_mm512_sub_epi32(n0v, c.sel_neg), c.sel_pos);
    const __mmask16 is_zero = _mm512_cmpge_epi32_mask(zero_sel, c.sel_pos) & _mm512_cmpge_epi32_mask(zero_sel, c.sel_neg);
    const __mmask16 pos_wins = _mm512_cmpge_epi32_mask(c.sel_pos, c.sel_neg);
    const __m512i c_a = _mm512_mask_mov_epi32(_mm512_mask_blend_epi32(pos_wins, _mm512_set1_epi32(-1), _mm512_set1_epi32(1)),
                                              is_zero, zero);
    __m512i k_a = _mm512_mask_blend_epi32(pos_wins, c.est_neg, c.est_pos);
    k_a = _mm512_mask_mov_epi32(k_a, is_zero, _mm512_sub_epi32(_mm512_sub_epi32(nv, c.est_neg), c.est_pos));
    k_a = _mm512_min_epi32(_mm512_max_epi32(k_a, zero), nv);
    const __m512 phi_inv_low = _mm512_i32gather_ps(k_a, p.radius_table, 4);
    const __mmask16 certified = _mm512_cmp_ps_mask(phi_inv_low, _mm512_setzero_ps(), _CMP_GT_OQ);
    const __mmask16 emit = certified & finite;
    const __m512i code = _mm512_maskz_mov_epi32(emit, c_a);
    const __m512 radius = _mm512_maskz_mov_ps(emit, _mm512_mul_ps(_mm512_mul_ps(sigma, phi_inv_low), shrink));
    _mm_mask_storeu_epi8(codes + base, valid, _mm512_cvtepi32_epi8(code));
    _mm512_mask_storeu_ps(radii + base, valid, radius);

    abstained += __builtin_popcount(static_cast<unsigned>(finite & ~certified));
    nonfinite += __builtin_popcount(static_cast<unsigned>(valid & ~finite));
    below += __builtin_popcount(static_cast<unsigned>(_mm512_cmp_ps_mask(radius, below_thr, _CMP_LT_OQ) & valid));
    min_bits = _mm512_mask_min_epi32(min_bits, valid, min_bits, _mm512_castps_si512(radius));
  }
  stats.min_radius_bits = _mm512_reduce_min_epi32(min_bits);
  stats.abstained += abstained;
  stats.nonfinite += nonfinite;
  stats.below += below;
}

}  // namespace cpu
}  // namespace unlearn

#pragma GCC pop_options

#endif  // UNLEARN_X86_VARIANTS
