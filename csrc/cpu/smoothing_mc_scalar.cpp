// Portable path of the CPU `mc` kernel (interface and contract: mc_kernel.h), written with the shared
// per-element math of unlearn/smoothing.h: the path every other one (smoothing_mc_avx2.cpp,
// smoothing_mc_avx512.cpp, smoothing_mc_neon.cpp) is compared with bit for bit. Compiled once, for the
// build's baseline ISA, where GCC vectorizes its lane loops; free of torch, so the standalone NEON
// test (tests/native/neon_bit_identity.cpp) links it too.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "mc_kernel.h"
#include "unlearn/smoothing.h"

namespace unlearn {
namespace cpu {
namespace {

constexpr int kLanes = 16;  // elements processed side by side: one AVX-512 register of uint32

// Adds one draw per lane to the class counters (separate arrays, so the loop vectorizes).
inline void count_draws(const uint32_t* __restrict words, const int32_t* __restrict neg_levels,
                        const int32_t* __restrict pos_start, int32_t* __restrict neg,
                        int32_t* __restrict pos) {
  for (int l = 0; l < kLanes; ++l) {
    const DrawThresholds t{neg_levels[l], pos_start[l]};
    neg[l] += draw_is_negative(words[l], t);
    pos[l] += draw_is_positive(words[l], t);
  }
}

}  // namespace

// Draws, counts and CERTIFY for every element of a span, kLanes elements side by side (each lane
// is one element's own Philox stream, so lanes never interact).
void mc_span_scalar(const float* p_neg, const float* p_pos, int64_t count, uint64_t global_begin,
                    const McDrawParams& p, int8_t* codes, float* radii, McSpanStats& s) {
  const uint32_t k0 = static_cast<uint32_t>(p.seed), k1 = static_cast<uint32_t>(p.seed >> 32);
  const int64_t blocks = (int64_t(p.n0) + p.n + 3) / 4;
  for (int64_t base = 0; base < count; base += kLanes) {
    const int lanes = static_cast<int>(std::min<int64_t>(kLanes, count - base));
    int32_t neg_levels[kLanes], pos_start[kLanes], finite[kLanes];
    uint32_t elem_lo[kLanes], elem_hi[kLanes];
    for (int l = 0; l < kLanes; ++l) {
      const bool in = l < lanes;
      const float pn = in ? p_neg[base + l] : 0.0f, pp = in ? p_pos[base + l] : 0.0f;
      finite[l] = !std::isnan(pn);  // levels_below(NaN) = 0 gives the non-finite thresholds {0, 2^24}
      neg_levels[l] = static_cast<int32_t>(levels_below(pn));
      pos_start[l] = static_cast<int32_t>(kUniformLevels - levels_below(pp));
      const uint64_t e = global_begin + static_cast<uint64_t>(base + l);
      elem_lo[l] = static_cast<uint32_t>(e);
      elem_hi[l] = static_cast<uint32_t>(e >> 32);
    }
    int32_t sel_neg[kLanes] = {}, sel_pos[kLanes] = {}, est_neg[kLanes] = {}, est_pos[kLanes] = {};
    for (int64_t b = 0; b < blocks; ++b) {
      const uint64_t ctr = p.offset + static_cast<uint64_t>(b);
      const uint32_t c0 = static_cast<uint32_t>(ctr), c1 = static_cast<uint32_t>(ctr >> 32);
      uint32_t words[4][kLanes];
      for (int l = 0; l < kLanes; ++l) {
        const PhiloxBlock r = philox4x32_10(c0, c1, elem_lo[l], elem_hi[l], k0, k1);
        words[0][l] = r.w[0];
        words[1][l] = r.w[1];
        words[2][l] = r.w[2];
        words[3][l] = r.w[3];
      }
      for (int q = 0; q < 4; ++q) {
        const int64_t j = 4 * b + q;  // draw index of this word
        if (j < p.n0) {
          count_draws(words[q], neg_levels, pos_start, sel_neg, sel_pos);
        } else if (j < int64_t(p.n0) + p.n) {
          count_draws(words[q], neg_levels, pos_start, est_neg, est_pos);
        }
      }
    }
    int32_t min_bits = s.min_radius_bits;
    for (int l = 0; l < lanes; ++l) {
      const Certified c = certify_from_counts(VoteCounts{sel_neg[l], sel_pos[l]}, p.n0,
                                              VoteCounts{est_neg[l], est_pos[l]}, p.n, p.radius_table, p.sigma);
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
}

}  // namespace cpu
}  // namespace unlearn
