// NEON path of the CPU `mc` kernel for aarch64 (interface and contract: mc_kernel.h): the n0 + n
// Philox draws of 8 elements at a time (two 4-lane register sets of philox_neon.h, advanced side by
// side) and their class counts in vector registers. The per-element ends stay scalar and call the
// very functions the portable path calls (levels_below for the thresholds, certify_from_counts for
// CERTIFY): they run once per element, the draws n0 + n times, so they cost little and are bit-identical
// by construction.
//
// Counting: with k = word >> 8, a draw is -1 when k < neg_levels and +1 when k >= max(pos_start,
// neg_levels) (draw_is_negative / draw_is_positive in unlearn/smoothing.h); a compare's all-ones lane
// is -1, so subtracting it counts up. Blocks whose four draws lie in one phase (selection or
// estimation) are counted without per-word checks.
//
// Verified against mc_span_scalar bit for bit under qemu-aarch64 (tests/native/neon_bit_identity.cpp);
// its speed has not been measured (no aarch64 machine).
#include "isa.h"

#if UNLEARN_NEON_VARIANT

#include <arm_neon.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "mc_kernel.h"
#include "philox_neon.h"
#include "unlearn/philox.h"
#include "unlearn/smoothing.h"

namespace unlearn {
namespace cpu {
namespace {

constexpr int kSets = 2;              // register sets of 4 elements advanced side by side
constexpr int kLanes = 4 * kSets;     // elements per group

// Running class counts of one phase for the group's sets.
struct PhaseCounts {
  uint32x4_t neg[kSets], pos[kSets];
};

inline void count_word(uint32x4_t word, const uint32x4_t (&neg_levels)[kSets], const uint32x4_t (&pos_from)[kSets],
                       int set, PhaseCounts& c) {
  const uint32x4_t k = vshrq_n_u32(word, 8);
  c.neg[set] = vsubq_u32(c.neg[set], vcltq_u32(k, neg_levels[set]));
  c.pos[set] = vsubq_u32(c.pos[set], vcgeq_u32(k, pos_from[set]));
}

// One group of kLanes elements starting at span index `base` (`lanes` of them real; the others read
// p = 0 and are neither stored nor counted in the statistics).
void mc_group(const float* p_neg, const float* p_pos, int64_t base, int lanes, uint64_t global_begin,
              const McDrawParams& p, int8_t* codes, float* radii, McSpanStats& s) {
  uint32_t neg_levels[kLanes], pos_from[kLanes];
  bool finite[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    const bool in = l < lanes;
    const float pn = in ? p_neg[base + l] : 0.0f, pp = in ? p_pos[base + l] : 0.0f;
    finite[l] = !std::isnan(pn);  // levels_below(NaN) = 0 gives the non-finite thresholds {0, 2^24}
    neg_levels[l] = levels_below(pn);
    pos_from[l] = std::max(kUniformLevels - levels_below(pp), neg_levels[l]);  // +1 also needs "not -1"
  }
  uint32x4_t neg_v[kSets], pos_v[kSets], elem_lo[kSets], elem_hi[kSets];
  for (int i = 0; i < kSets; ++i) {
    neg_v[i] = vld1q_u32(neg_levels + 4 * i);
    pos_v[i] = vld1q_u32(pos_from + 4 * i);
    element_words_neon(global_begin + static_cast<uint64_t>(base + 4 * i), elem_lo[i], elem_hi[i]);
  }
  PhaseCounts sel, est;
  for (int i = 0; i < kSets; ++i) sel.neg[i] = sel.pos[i] = est.neg[i] = est.pos[i] = vdupq_n_u32(0);

  const uint32_t k0 = static_cast<uint32_t>(p.seed), k1 = static_cast<uint32_t>(p.seed >> 32);
  const int64_t n0 = p.n0, draws = int64_t(p.n0) + p.n;
  const int64_t blocks = (draws + 3) / 4;
  for (int64_t b = 0; b < blocks; ++b) {
    const uint64_t ctr = p.offset + static_cast<uint64_t>(b);
    uint32x4_t w[kSets][4];
    for (int i = 0; i < kSets; ++i) {
      w[i][0] = vdupq_n_u32(static_cast<uint32_t>(ctr));
      w[i][1] = vdupq_n_u32(static_cast<uint32_t>(ctr >> 32));
      w[i][2] = elem_lo[i];
      w[i][3] = elem_hi[i];
    }
    philox_rounds_neon<kSets>(w, k0, k1);
    const int64_t first = 4 * b;  // draw index of the block's word 0
    if (first + 4 <= n0 || (first >= n0 && first + 4 <= draws)) {
      PhaseCounts& c = first < n0 ? sel : est;
      for (int q = 0; q < 4; ++q)
        for (int i = 0; i < kSets; ++i) count_word(w[i][q], neg_v, pos_v, i, c);
    } else {  // split by the phase boundary, or the partial last block
      for (int q = 0; q < 4 && first + q < draws; ++q)
        for (int i = 0; i < kSets; ++i) count_word(w[i][q], neg_v, pos_v, i, first + q < n0 ? sel : est);
    }
  }

  uint32_t sel_neg[kLanes], sel_pos[kLanes], est_neg[kLanes], est_pos[kLanes];
  for (int i = 0; i < kSets; ++i) {
    vst1q_u32(sel_neg + 4 * i, sel.neg[i]);
    vst1q_u32(sel_pos + 4 * i, sel.pos[i]);
    vst1q_u32(est_neg + 4 * i, est.neg[i]);
    vst1q_u32(est_pos + 4 * i, est.pos[i]);
  }
  int32_t min_bits = s.min_radius_bits;
  for (int l = 0; l < lanes; ++l) {
    const Certified c = certify_from_counts(
        VoteCounts{static_cast<int32_t>(sel_neg[l]), static_cast<int32_t>(sel_pos[l])}, p.n0,
        VoteCounts{static_cast<int32_t>(est_neg[l]), static_cast<int32_t>(est_pos[l])}, p.n, p.radius_table, p.sigma);
    const int8_t code = finite[l] ? c.code : int8_t(0);
    const float radius = finite[l] ? c.radius : 0.0f;
    codes[base + l] = code;
    radii[base + l] = radius;
    s.abstained += finite[l] ? c.abstained : 0;
    s.nonfinite += !finite[l];
    s.below += radius < p.below_threshold;
    min_bits = std::min(min_bits, float_bits(radius));
  }
  s.min_radius_bits = min_bits;
}

}  // namespace

void mc_span_neon(const float* p_neg, const float* p_pos, int64_t count, uint64_t global_begin,
                  const McDrawParams& p, int8_t* codes, float* radii, McSpanStats& stats) {
  for (int64_t base = 0; base < count; base += kLanes)
    mc_group(p_neg, p_pos, base, static_cast<int>(std::min<int64_t>(kLanes, count - base)), global_begin, p, codes,
             radii, stats);
}

}  // namespace cpu
}  // namespace unlearn

#endif  // UNLEARN_NEON_VARIANT
