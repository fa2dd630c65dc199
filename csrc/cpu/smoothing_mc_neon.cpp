// NEON path of the CPU `mc` kernel for aarch64 (interface and contract: mc_kernel.h): the draw loop
// of mc_group.h's walk, the n0 + n Philox draws of 8 elements at a time (two 4-lane register sets of
// philox_neon.h, advanced side by side) and their class counts in vector registers.
//
// Counting: with k = word >> 8, a draw is -1 when k < neg_levels and +1 when k >= max(pos_start,
// neg_levels) (draw_is_negative / draw_is_positive in unlearn/smoothing.h); a compare's all-ones lane
// is -1, so subtracting it counts up. Blocks whose four draws lie in one phase (selection or
// estimation) are counted without per-word checks (for_each_block_run).
//
// Verified against mc_span_scalar bit for bit under qemu-aarch64 (tests/native/neon_bit_identity.cpp);
// its speed has not been measured (no aarch64 machine).
#include "isa.h"

#if UNLEARN_NEON_VARIANT

#include <arm_neon.h>

#include <cstdint>

#include "mc_group.h"
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

// Blocks [first, last) of the group: the four words of each, for both register sets, to use(w).
template <typename Use>
inline void group_blocks(const uint32x4_t (&elem_lo)[kSets], const uint32x4_t (&elem_hi)[kSets], const McDrawParams& p,
                         uint64_t first, uint64_t last, Use&& use) {
  const uint32_t k0 = static_cast<uint32_t>(p.seed), k1 = static_cast<uint32_t>(p.seed >> 32);
  for (uint64_t b = first; b < last; ++b) {
    const uint64_t ctr = p.offset + b;
    uint32x4_t w[kSets][4];
    for (int i = 0; i < kSets; ++i) {
      w[i][0] = vdupq_n_u32(static_cast<uint32_t>(ctr));
      w[i][1] = vdupq_n_u32(static_cast<uint32_t>(ctr >> 32));
      w[i][2] = elem_lo[i];
      w[i][3] = elem_hi[i];
    }
    philox_rounds_neon<kSets>(w, k0, k1);
    use(b, w);
  }
}

// Class counts of the n0 selection and n estimation draws of a group (mc_group.h).
void count_group(const McGroup<kLanes>& g, const McDrawParams& p, McGroupCounts<kLanes>& counts) {
  uint32x4_t neg_v[kSets], pos_v[kSets], elem_lo[kSets], elem_hi[kSets];
  for (int i = 0; i < kSets; ++i) {
    neg_v[i] = vreinterpretq_u32_s32(vld1q_s32(g.neg_levels + 4 * i));
    pos_v[i] = vreinterpretq_u32_s32(vld1q_s32(g.pos_from + 4 * i));
    element_words_neon(g.element0 + static_cast<uint64_t>(4 * i), elem_lo[i], elem_hi[i]);
  }
  PhaseCounts sel, est;
  for (int i = 0; i < kSets; ++i) sel.neg[i] = sel.pos[i] = est.neg[i] = est.pos[i] = vdupq_n_u32(0);
  for_each_block_run(
      p,
      [&](uint64_t first, uint64_t last, bool estimation) {
        PhaseCounts& c = estimation ? est : sel;
        group_blocks(elem_lo, elem_hi, p, first, last, [&](uint64_t, const uint32x4_t (&w)[kSets][4]) {
          for (int q = 0; q < 4; ++q)
            for (int i = 0; i < kSets; ++i) count_word(w[i][q], neg_v, pos_v, i, c);
        });
      },
      [&](uint64_t split) {
        group_blocks(elem_lo, elem_hi, p, split, split + 1, [&](uint64_t block, const uint32x4_t (&w)[kSets][4]) {
          for (int q = 0; q < 4; ++q) {
            const DrawPhase phase = draw_phase(block, q, p);
            if (phase == DrawPhase::kNone) break;
            for (int i = 0; i < kSets; ++i)
              count_word(w[i][q], neg_v, pos_v, i, phase == DrawPhase::kSelection ? sel : est);
          }
        });
      });
  for (int i = 0; i < kSets; ++i) {
    vst1q_s32(counts.sel_neg + 4 * i, vreinterpretq_s32_u32(sel.neg[i]));
    vst1q_s32(counts.sel_pos + 4 * i, vreinterpretq_s32_u32(sel.pos[i]));
    vst1q_s32(counts.est_neg + 4 * i, vreinterpretq_s32_u32(est.neg[i]));
    vst1q_s32(counts.est_pos + 4 * i, vreinterpretq_s32_u32(est.pos[i]));
  }
}

}  // namespace

void mc_span_neon(const float* p_neg, const float* p_pos, int64_t count, uint64_t global_begin,
                  const McDrawParams& p, int8_t* codes, float* radii, McSpanStats& stats) {
  mc_span_groups<kLanes>(p_neg, p_pos, count, global_begin, p, codes, radii, stats,
                         [&](const McGroup<kLanes>& g, McGroupCounts<kLanes>& c) { count_group(g, p, c); });
}

}  // namespace cpu
}  // namespace unlearn

#endif  // UNLEARN_NEON_VARIANT
