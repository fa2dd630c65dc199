// AVX2 path of the CPU `mc` kernel (interface and contract: mc_kernel.h): the draw loop of
// mc_group.h's walk, the n0 + n Philox draws of 8 elements at a time and their class counts. The
// thresholds, CERTIFY, stores and statistics are mc_group.h's lane loops, compiled here for AVX2.
//
// AVX2 has no unsigned compares and no mask registers: thresholds and words are compared as signed
// integers after flipping their top bits (x <u y <=> x ^ 2^31 <s y ^ 2^31), and a compare's all-ones
// lanes (-1) are subtracted from the counters. +1 is counted as "not below pos_words", i.e. the draws
// of a phase minus those below it.
//
// Where the time goes: the Philox rounds, ~5 vector operations per draw (AVX2 has no three-way xor).
// So the draw loop keeps the operation count at that floor and the pipes fed: rounds 1-3 of every
// block share their element terms (StreamSet, once per group), the round keys are broadcast once per
// span (RoundKeys), two blocks of a group advance round by round side by side (4 register sets, 8
// independent multiply chains), the high halves move down by dword shuffles (a shuffle pipe) rather
// than 64-bit shifts (which compete with vpmuludq on Zen 3), one vshufps gathers a word of 8
// elements, and blocks inside one phase are counted without per-word checks.
//
// Like the AVX-512 file, this one enables AVX2 for its own functions only (#pragma GCC target, after
// every shared include), so a portable build contains it and the AVX2 copy of smoothing_cpu.cpp
// calls it where the CPU has AVX2 (isa.h).
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
#pragma GCC target("avx2,fma,bmi,bmi2,popcnt,lzcnt")
// Pressure-aware scheduling before register allocation: the draw loop keeps 16 Philox state registers
// live, and GCC's default (no pre-allocation scheduling on x86) spills them into the multiply
// chains; with it the kernel measured ~20% faster on Zen 3.
#pragma GCC optimize("schedule-insns", "sched-pressure")
#include <immintrin.h>

#include "mc_group.h"

namespace unlearn {
namespace cpu {
namespace {

constexpr int kLanes = 8;
// Philox blocks of one group computed side by side in the draw loop: 2 blocks = 4 register sets = 8
// multiply chains, enough to keep Zen 3's two vpmuludq pipes busy; 3 or more spill (measured slower).
constexpr int kBlocksPerStep = 2;

// The per-round key words of Philox, broadcast once per span so that the unrolled rounds read them
// as memory operands instead of rebuilding them from scalars every block. The last round's key words
// also carry the sign flip of the signed compares below (x ^ k ^ 2^31), which then costs nothing for
// words 0 and 2.
struct RoundKeys {
  __m256i key0[10], key1[10];
};

inline void fill_round_keys(uint64_t seed, RoundKeys& keys) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint32_t flip = round == 9 ? 0x80000000u : 0u;
    keys.key0[round] = _mm256_set1_epi32(static_cast<int>(k0 ^ flip));
    keys.key1[round] = _mm256_set1_epi32(static_cast<int>(k1 ^ flip));
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

// The sign bit of every lane: flipping it turns unsigned order into signed order.
inline __m256i top_bits() { return _mm256_set1_epi32(static_cast<int>(0x80000000u)); }

// The 8 elements of a group are two sets of 4 Philox streams in the 64-bit lane layout of
// philox_avx2.h (a stream's 32-bit word in the low half of a 64-bit lane, where vpmuludq reads it):
// set 0 holds elements 0, 1, 4, 5 and set 1 elements 2, 3, 6, 7, so that one vshufps per word
// (draw_word) gathers the low halves of both in element order, without crossing 128-bit lanes.
//
// Rounds 1 to 3 of a block see the block only through its counter (offset + block): the low counter
// word enters through two scalars per block (BlockWords), the high one is the same for every block
// of a run that does not cross a multiple of 2^32 (a "segment"). What they see of the element is
// computed once per group and segment (StreamSet), so a block's first three rounds cost 12 vector
// operations per set instead of 24.
struct StreamSet {
  __m256i y2;  // round 1, word 2 without the block's term: element_hi ^ k0'
  __m256i a;   // round 2, word 1 ^ key0 of round 2: M1 * element_lo ^ key
  __m256i s;   // round 2, hi(p0): p0 = M0 * (round-1 word 0), the same for every block of a segment
  __m256i q;   // round 3, word 3 ^ key1 of round 3: p0 ^ key
};

inline StreamSet stream_set(__m256i element, uint32_t ctr_hi, uint32_t k0, uint32_t k1, const RoundKeys& keys) {
  const __m256i prod = _mm256_mul_epu32(element, _mm256_set1_epi64x(kPhiloxM1));
  const __m256i w0 = _mm256_xor_si256(_mm256_srli_epi64(prod, 32), _mm256_set1_epi32(static_cast<int>(k0 ^ ctr_hi)));
  const __m256i p0 = _mm256_mul_epu32(w0, _mm256_set1_epi64x(kPhiloxM0));
  return StreamSet{_mm256_xor_si256(_mm256_srli_epi64(element, 32), _mm256_set1_epi32(static_cast<int>(k1))),
                   _mm256_xor_si256(prod, keys.key0[1]), _mm256_srli_epi64(p0, 32), _mm256_xor_si256(p0, keys.key1[2])};
}

// The two words of a block's counter that rounds 1 and 2 need, as broadcasts: hi(M0 * ctr_lo) for
// round 1's word 2, and lo(M0 * ctr_lo) ^ key1 of round 2 for round 2's word 2.
struct BlockWords {
  __m256i c, b;
};

inline BlockWords block_words(uint64_t ctr, uint32_t k1_round2) {
  const uint64_t prod = static_cast<uint64_t>(kPhiloxM0) * static_cast<uint32_t>(ctr);
  return BlockWords{_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(prod >> 32))),
                    _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(prod) ^ k1_round2))};
}

// The high 32-bit half of each 64-bit lane moved to the low half, where vpmuludq reads it (the new
// high half is don't-care: nothing reads it). A dword shuffle rather than a 64-bit shift because
// on Zen 3 shifts compete with vpmuludq for the same two pipes and shuffles do not.
inline __m256i high_half(__m256i x) { return _mm256_shuffle_epi32(x, _MM_SHUFFLE(2, 3, 0, 1)); }

// All 10 rounds of kSets register sets (philox4x32_10's arithmetic; rounds 1-3 from the StreamSets,
// the rest unrolled with the keys read from the table). The last round's key carries the sign flip.
// The sets advance round by round side by side: each is two serial multiply-shift-xor chains, and
// only chains that sit close together in program order overlap in the out-of-order window.
template <int kSets>
inline void philox_blocks(const StreamSet* const (&set)[kSets], const BlockWords* const (&bw)[kSets],
                          const RoundKeys& keys, __m256i (&w)[kSets][4]) {
  const __m256i m0 = _mm256_set1_epi64x(kPhiloxM0), m1 = _mm256_set1_epi64x(kPhiloxM1);
  __m256i p1[kSets];
  // Rounds 1 and 2.
#pragma GCC unroll 4
  for (int i = 0; i < kSets; ++i) {
    p1[i] = _mm256_mul_epu32(_mm256_xor_si256(set[i]->y2, bw[i]->c), m1);
    w[i][0] = _mm256_xor_si256(high_half(p1[i]), set[i]->a);
    w[i][2] = _mm256_xor_si256(set[i]->s, bw[i]->b);
  }
  // Round 3 (its word 3 is the StreamSet's p0).
#pragma GCC unroll 4
  for (int i = 0; i < kSets; ++i) {
    const __m256i q0 = _mm256_mul_epu32(w[i][0], m0), q1 = _mm256_mul_epu32(w[i][2], m1);
    w[i][0] = _mm256_xor_si256(high_half(q1), _mm256_xor_si256(p1[i], keys.key0[2]));
    w[i][2] = _mm256_xor_si256(high_half(q0), set[i]->q);
    w[i][1] = q1;
    w[i][3] = q0;
  }
#pragma GCC unroll 7
  for (int round = 3; round < 10; ++round) {
#pragma GCC unroll 4
    for (int i = 0; i < kSets; ++i) {
      const __m256i q0 = _mm256_mul_epu32(w[i][0], m0), q1 = _mm256_mul_epu32(w[i][2], m1);
      // The key joins the old word first, off the multiply-shift chain that bounds a block's latency.
      w[i][0] = _mm256_xor_si256(high_half(q1), _mm256_xor_si256(w[i][1], keys.key0[round]));
      w[i][2] = _mm256_xor_si256(high_half(q0), _mm256_xor_si256(w[i][3], keys.key1[round]));
      w[i][1] = q1;
      w[i][3] = q0;
    }
  }
}

// Word q of the group's 8 elements in element order, top bit flipped for the signed compares:
// words 0 and 2 come flipped from the last round's key, words 1 and 3 (low halves of products) here.
inline __m256i draw_word(const __m256i (&set0)[4], const __m256i (&set1)[4], int q) {
  const __m256i word = _mm256_castps_si256(
      _mm256_shuffle_ps(_mm256_castsi256_ps(set0[q]), _mm256_castsi256_ps(set1[q]), _MM_SHUFFLE(2, 0, 2, 0)));
  return (q & 1) ? _mm256_xor_si256(word, top_bits()) : word;
}

// Counters of draws below the two thresholds; a compare yields -1 per lane, so they count down.
struct BelowCounts {
  __m256i neg, below_pos;
};

inline void count_word(__m256i word, __m256i neg_words, __m256i pos_words, BelowCounts& c) {
  c.neg = _mm256_sub_epi32(c.neg, _mm256_cmpgt_epi32(neg_words, word));
  c.below_pos = _mm256_sub_epi32(c.below_pos, _mm256_cmpgt_epi32(pos_words, word));
}

// A group of 8 elements and what every block of it shares.
struct Group {
  __m256i element[2];  // the global element indices of the two sets
  uint32_t k0, k1, k1_round2;
  const RoundKeys* keys;
  __m256i neg_words, pos_words;  // thresholds on the flipped words
  StreamSet sets[2];             // for counters whose high word is sets_ctr_hi (that of the first block)
  uint32_t sets_ctr_hi;
};

inline Group make_group(uint64_t element0, const McDrawParams& p, const RoundKeys& keys, __m256i neg_words,
                        __m256i pos_words) {
  const __m256i e = _mm256_set1_epi64x(static_cast<long long>(element0));
  Group g;
  g.element[0] = _mm256_add_epi64(e, _mm256_setr_epi64x(0, 1, 4, 5));
  g.element[1] = _mm256_add_epi64(e, _mm256_setr_epi64x(2, 3, 6, 7));
  g.k0 = static_cast<uint32_t>(p.seed);
  g.k1 = static_cast<uint32_t>(p.seed >> 32);
  g.k1_round2 = g.k1 + kPhiloxW1;
  g.keys = &keys;
  g.neg_words = neg_words;
  g.pos_words = pos_words;
  g.sets_ctr_hi = static_cast<uint32_t>(p.offset >> 32);
  for (int i = 0; i < 2; ++i) g.sets[i] = stream_set(g.element[i], g.sets_ctr_hi, g.k0, g.k1, keys);
  return g;
}

// Blocks [first, last) of one segment (counters offset + block share their high word): the words
// of each block, handed to use(block, set0, set1). kBlocks blocks are computed side by side, so
// that the out-of-order core has independent multiply chains to overlap.
template <int kBlocks, typename Use>
inline void segment_blocks(const Group& g, uint64_t first, uint64_t last, uint64_t offset, Use&& use) {
  const uint32_t ctr_hi = static_cast<uint32_t>((offset + first) >> 32);
  StreamSet wrapped[2];  // only where the counters passed a multiple of 2^32 after the first block
  const StreamSet* sets = g.sets;
  if (ctr_hi != g.sets_ctr_hi) {
    for (int i = 0; i < 2; ++i) wrapped[i] = stream_set(g.element[i], ctr_hi, g.k0, g.k1, *g.keys);
    sets = wrapped;
  }
  uint64_t b = first;
  for (; b + kBlocks <= last; b += kBlocks) {
    BlockWords bw[kBlocks];
    const StreamSet* set_of[2 * kBlocks];
    const BlockWords* words_of[2 * kBlocks];
    for (int i = 0; i < kBlocks; ++i) {
      bw[i] = block_words(offset + b + i, g.k1_round2);
      set_of[2 * i] = &sets[0];
      set_of[2 * i + 1] = &sets[1];
      words_of[2 * i] = words_of[2 * i + 1] = &bw[i];
    }
    __m256i w[2 * kBlocks][4];
    philox_blocks<2 * kBlocks>(set_of, words_of, *g.keys, w);
#pragma GCC unroll 2
    for (int i = 0; i < kBlocks; ++i) use(b + i, w[2 * i], w[2 * i + 1]);
  }
  for (; b < last; ++b) {
    const BlockWords bw = block_words(offset + b, g.k1_round2);
    const StreamSet* set_of[2] = {&sets[0], &sets[1]};
    const BlockWords* words_of[2] = {&bw, &bw};
    __m256i w[2][4];
    philox_blocks<2>(set_of, words_of, *g.keys, w);
    use(b, w[0], w[1]);
  }
}

// Blocks [first, last), split where the counter's high word changes (at most once, since a span has
// far fewer than 2^32 blocks).
template <int kBlocks, typename Use>
inline void blocks(const Group& g, uint64_t first, uint64_t last, uint64_t offset, Use&& use) {
  while (first < last) {
    const uint64_t ctr = offset + first;
    const uint64_t to_next_high = (uint64_t(1) << 32) - static_cast<uint32_t>(ctr);  // blocks until ctr_hi changes
    const uint64_t end = last - first > to_next_high ? first + to_next_high : last;
    segment_blocks<kBlocks>(g, first, end, offset, use);
    first = end;
  }
}

// Blocks [first, last) whose 4 draws all belong to one phase, counted into `c` without per-word checks.
inline void count_whole_blocks(const Group& g, uint64_t first, uint64_t last, uint64_t offset, BelowCounts& c) {
  blocks<kBlocksPerStep>(g, first, last, offset, [&](uint64_t, const __m256i (&s0)[4], const __m256i (&s1)[4]) {
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) count_word(draw_word(s0, s1, q), g.neg_words, g.pos_words, c);
  });
}

// Class counts of the n0 selection and n estimation draws of a group (mc_group.h). For a level count
// L < 2^24, (word >> 8) < L <=> word < L * 256 (unsigned); L = 2^24 (every draw below) wraps to 0
// and is fixed after the loop (fix_wrapped_thresholds).
__attribute__((noinline)) void count_group(const McGroup<kLanes>& group, const McDrawParams& p, const RoundKeys& keys,
                                            McGroupCounts<kLanes>& c) {
  const __m256i neg_levels = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(group.neg_levels));
  const __m256i pos_from = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(group.pos_from));
  const __m256i neg_words = _mm256_xor_si256(_mm256_slli_epi32(neg_levels, 8), top_bits());  // -1 iff word <  these
  const __m256i pos_words = _mm256_xor_si256(_mm256_slli_epi32(pos_from, 8), top_bits());    // +1 iff word >= these
  const Group g = make_group(group.element0, p, keys, neg_words, pos_words);
  BelowCounts sel{_mm256_setzero_si256(), _mm256_setzero_si256()}, est = sel;
  for_each_block_run(
      p, [&](uint64_t first, uint64_t last, bool estimation) { count_whole_blocks(g, first, last, p.offset, estimation ? est : sel); },
      [&](uint64_t split) {
        blocks<1>(g, split, split + 1, p.offset, [&](uint64_t block, const __m256i (&s0)[4], const __m256i (&s1)[4]) {
          for (int q = 0; q < 4; ++q) {
            const DrawPhase phase = draw_phase(block, q, p);
            if (phase == DrawPhase::kNone) break;
            count_word(draw_word(s0, s1, q), neg_words, pos_words, phase == DrawPhase::kSelection ? sel : est);
          }
        });
      });
  // +1 was counted as "not below pos_words": the draws of a phase minus those below.
  const __m256i n0v = _mm256_set1_epi32(p.n0), nv = _mm256_set1_epi32(p.n);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(c.sel_neg), sel.neg);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(c.est_neg), est.neg);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(c.sel_pos), _mm256_sub_epi32(n0v, sel.below_pos));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(c.est_pos), _mm256_sub_epi32(nv, est.below_pos));
  fix_wrapped_thresholds(group, p, c);
}

}  // namespace

void mc_span_avx2(const float* p_neg, const float* p_pos, int64_t count, uint64_t global_begin,
                  const McDrawParams& p, int8_t* codes, float* radii, McSpanStats& stats) {
  RoundKeys keys;
  fill_round_keys(p.seed, keys);
  mc_span_groups<kLanes>(p_neg, p_pos, count, global_begin, p, codes, radii, stats,
                         [&](const McGroup<kLanes>& g, McGroupCounts<kLanes>& c) { count_group(g, p, keys, c); });
}

}  // namespace cpu
}  // namespace unlearn

#pragma GCC pop_options

#endif  // UNLEARN_X86_VARIANTS
