// AVX-512 path of the CPU `mc` kernel (interface and contract: mc_kernel.h): the draw loop of
// mc_group.h's walk, the n0 + n Philox draws of 16 elements at a time (the 64-bit lane layout of
// philox_avx512.h, two blocks in flight) and their class counts in mask-added registers. The
// thresholds, CERTIFY, stores and statistics are mc_group.h's lane loops, compiled here for AVX-512.
//
// This file enables AVX-512 for its own functions only (#pragma GCC target), so a portable build
// (no -march=native) still contains this path, and the AVX-512 copy of smoothing_cpu.cpp calls it
// where the CPU has AVX-512 (isa.h). Everything included before the pragma keeps the build's
// default target: inline functions of shared headers must not be emitted here with AVX-512
// instructions, or the linker could hand those copies to code that runs on CPUs without it.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "isa.h"
#include "mc_kernel.h"
#include "unlearn/float_math.h"
#include "unlearn/philox.h"
#include "unlearn/smoothing.h"

#if UNLEARN_X86_VARIANTS

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl")
#include <immintrin.h>

#include "mc_group.h"
#include "philox_avx512.h"

namespace unlearn {
namespace cpu {
namespace {

constexpr int kLanes = 16;
// Philox blocks computed side by side for one group of 16 elements: each block is two registers
// (8 elements each) whose 9 vector rounds are serial multiply chains; 2 blocks = 4 chains in
// flight, enough to cover vpmuludq's latency without spilling the 32 registers.
constexpr int kBlocksInFlight = 2;

// Blocks [first, last) of the group, kBlocksInFlight at a time (the rest one by one): the 16 words of
// each draw index q, to use(block, q, word).
template <typename Use>
inline void group_blocks(const PhiloxFirstRound64 (&f)[2], const McDrawParams& p, uint64_t first, uint64_t last,
                         Use&& use) {
  const uint32_t k0 = static_cast<uint32_t>(p.seed), k1 = static_cast<uint32_t>(p.seed >> 32);
  uint64_t b = first;
  for (; b + kBlocksInFlight <= last; b += kBlocksInFlight) {
    __m512i w[2 * kBlocksInFlight][4];
    for (int i = 0; i < kBlocksInFlight; ++i) {
      philox_after_first_round64(f[0], p.offset + b + i, w[2 * i]);
      philox_after_first_round64(f[1], p.offset + b + i, w[2 * i + 1]);
    }
    philox_rounds_2_to_10_64<2 * kBlocksInFlight>(w, k0, k1);
    for (int i = 0; i < kBlocksInFlight; ++i)
      for (int q = 0; q < 4; ++q) use(b + i, q, pack_low_halves64(w[2 * i][q], w[2 * i + 1][q]));
  }
  for (; b < last; ++b) {
    __m512i w[2][4];
    philox_after_first_round64(f[0], p.offset + b, w[0]);
    philox_after_first_round64(f[1], p.offset + b, w[1]);
    philox_rounds_2_to_10_64<2>(w, k0, k1);
    for (int q = 0; q < 4; ++q) use(b, q, pack_low_halves64(w[0][q], w[1][q]));
  }
}

// Running class counts of one phase.
struct PhaseCounts {
  __m512i neg, pos;
};

// Class counts of the n0 selection and n estimation draws of a group (mc_group.h). Thresholds are
// compared with whole 32-bit words: for a level count L < 2^24, (word >> 8) < L <=> word < L * 256
// (unsigned), which saves a shift per word; L = 2^24 (every draw below) wraps to 0 and is fixed
// after the loop (fix_wrapped_thresholds). Inlined into the group walk: as a call (GCC's choice) it
// cost a vzeroupper and a reload of the walk's vector constants per group, ~5% of the kernel at
// n0 = n = 1 on Zen 5; the 32 zmm registers hold both loops' values.
__attribute__((always_inline)) inline void count_group(const McGroup<kLanes>& g, const McDrawParams& p, McGroupCounts<kLanes>& counts) {
  const __m512i neg_words = _mm512_slli_epi32(_mm512_load_si512(g.neg_levels), 8);  // class -1 iff word <  these
  const __m512i pos_words = _mm512_slli_epi32(_mm512_load_si512(g.pos_from), 8);    // class +1 iff word >= these
  const __m512i one = _mm512_set1_epi32(1);
  const uint32_t k0 = static_cast<uint32_t>(p.seed), k1 = static_cast<uint32_t>(p.seed >> 32);
  const __m512i first = _mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(g.element0)),
                                         _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7));
  const __m512i second = _mm512_add_epi64(first, _mm512_set1_epi64(8));
  const PhiloxFirstRound64 f[2] = {philox_first_round64(first, k0, k1), philox_first_round64(second, k0, k1)};
  PhaseCounts sel{_mm512_setzero_si512(), _mm512_setzero_si512()}, est = sel;
  const auto count_word = [&](__m512i word, PhaseCounts& c) {
    c.neg = _mm512_mask_add_epi32(c.neg, _mm512_cmplt_epu32_mask(word, neg_words), c.neg, one);
    c.pos = _mm512_mask_add_epi32(c.pos, _mm512_cmpge_epu32_mask(word, pos_words), c.pos, one);
  };
  // Every block in one walk, kBlocksInFlight at a time, each word assigned by draw_phase (a scalar
  // branch the predictor learns, since every group has the same n0 and n). Not for_each_block_run's
  // runs: walked run by run, a split block and an odd last block of a run are computed alone, with
  // half the multiply chains in flight, which measured 22-38% slower at n0 + n = 12 or 40 on Zen 5.
  const uint64_t blocks = (static_cast<uint64_t>(p.n0) + static_cast<uint64_t>(p.n) + 3) / 4;
  group_blocks(f, p, 0, blocks, [&](uint64_t block, int q, __m512i word) {
    const DrawPhase phase = draw_phase(block, q, p);
    if (phase == DrawPhase::kSelection) count_word(word, sel);
    else if (phase == DrawPhase::kEstimation) count_word(word, est);
  });
  _mm512_store_si512(counts.sel_neg, sel.neg);
  _mm512_store_si512(counts.sel_pos, sel.pos);
  _mm512_store_si512(counts.est_neg, est.neg);
  _mm512_store_si512(counts.est_pos, est.pos);
  fix_wrapped_thresholds(g, p, counts);
}

// CERTIFY's table read as one vgatherdps: GCC's generic tuning reads the 16 lanes one load at a time,
// which cost up to ~10% per group (n0 = n = 1) against the hand-written path before mc_group.h.
struct GatherTableRead {
  void operator()(const float* table, const int32_t (&index)[kLanes], float (&entry)[kLanes]) const {
    _mm512_storeu_ps(entry, _mm512_i32gather_ps(_mm512_loadu_si512(index), table, 4));
  }
};

}  // namespace

void mc_span_avx512(const float* p_neg, const float* p_pos, int64_t count, uint64_t global_begin,
                    const McDrawParams& p, int8_t* codes, float* radii, McSpanStats& stats) {
  mc_span_groups<kLanes>(p_neg, p_pos, count, global_begin, p, codes, radii, stats,
                         [&](const McGroup<kLanes>& g, McGroupCounts<kLanes>& c) { count_group(g, p, c); },
                         GatherTableRead{});
}

}  // namespace cpu
}  // namespace unlearn

#pragma GCC pop_options

#endif  // UNLEARN_X86_VARIANTS
