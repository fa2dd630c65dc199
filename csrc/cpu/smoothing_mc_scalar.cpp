// Portable path of the CPU `mc` kernel (interface and contract: mc_kernel.h): the draw loop of
// mc_group.h's walk, written with the shared per-element math of unlearn/smoothing.h. Compiled once,
// for the build's baseline ISA, where GCC vectorizes its lane loops; free of torch, so the standalone
// NEON test (tests/native/neon_bit_identity.cpp) links it too.
#include <cstdint>

#include "mc_group.h"
#include "mc_kernel.h"
#include "unlearn/philox.h"
#include "unlearn/smoothing.h"

namespace unlearn {
namespace cpu {
namespace {

constexpr int kLanes = 16;  // elements processed side by side: one AVX-512 register of uint32

// The four words of block `block` for every lane (each lane is one element's own Philox stream, so
// lanes never interact).
inline void draw_block(const McGroup<kLanes>& g, const McDrawParams& p, uint64_t block, uint32_t (&words)[4][kLanes]) {
  const uint32_t k0 = static_cast<uint32_t>(p.seed), k1 = static_cast<uint32_t>(p.seed >> 32);
  const uint64_t ctr = p.offset + block;
  const uint32_t c0 = static_cast<uint32_t>(ctr), c1 = static_cast<uint32_t>(ctr >> 32);
  for (int l = 0; l < kLanes; ++l) {
    const uint64_t e = g.element0 + static_cast<uint64_t>(l);
    const PhiloxBlock r = philox4x32_10(c0, c1, static_cast<uint32_t>(e), static_cast<uint32_t>(e >> 32), k0, k1);
    for (int q = 0; q < 4; ++q) words[q][l] = r.w[q];
  }
}

// Adds one draw per lane to the class counters (separate arrays, so the loop vectorizes).
inline void count_draws(const uint32_t* __restrict words, const McGroup<kLanes>& g, int32_t* __restrict neg,
                        int32_t* __restrict pos) {
  for (int l = 0; l < kLanes; ++l) {
    const DrawThresholds t{g.neg_levels[l], g.pos_from[l]};
    neg[l] += draw_is_negative(words[l], t);
    pos[l] += draw_is_positive(words[l], t);
  }
}

void count_group(const McGroup<kLanes>& g, const McDrawParams& p, McGroupCounts<kLanes>& c) {
  for (int l = 0; l < kLanes; ++l) c.sel_neg[l] = c.sel_pos[l] = c.est_neg[l] = c.est_pos[l] = 0;
  uint32_t words[4][kLanes];
  for_each_block_run(
      p,
      [&](uint64_t first, uint64_t last, bool estimation) {
        int32_t* neg = estimation ? c.est_neg : c.sel_neg;
        int32_t* pos = estimation ? c.est_pos : c.sel_pos;
        for (uint64_t b = first; b < last; ++b) {
          draw_block(g, p, b, words);
          for (int q = 0; q < 4; ++q) count_draws(words[q], g, neg, pos);
        }
      },
      [&](uint64_t block) {
        draw_block(g, p, block, words);
        for (int q = 0; q < 4; ++q) {
          const DrawPhase phase = draw_phase(block, q, p);
          if (phase == DrawPhase::kSelection) count_draws(words[q], g, c.sel_neg, c.sel_pos);
          if (phase == DrawPhase::kEstimation) count_draws(words[q], g, c.est_neg, c.est_pos);
        }
      });
}

}  // namespace

void mc_span_scalar(const float* p_neg, const float* p_pos, int64_t count, uint64_t global_begin,
                    const McDrawParams& p, int8_t* codes, float* radii, McSpanStats& stats) {
  mc_span_groups<kLanes>(p_neg, p_pos, count, global_begin, p, codes, radii, stats,
                         [&](const McGroup<kLanes>& g, McGroupCounts<kLanes>& c) { count_group(g, p, c); });
}

}  // namespace cpu
}  // namespace unlearn
