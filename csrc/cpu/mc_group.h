// The ISA-independent parts of the CPU `mc` kernel (interface: mc_kernel.h), written once for every
// path (smoothing_mc_{scalar,avx2,avx512,neon}.cpp): the walk over a span in groups of kLanes
// elements with its ragged tail, each element's draw thresholds, the split of the n0 + n draws into
// Philox blocks by phase, and CERTIFY with the stores and statistics. A path supplies only how it
// draws and counts one group (its vector inner loop) and, where its gather measured faster, CERTIFY's
// table read; everything here calls the very functions of
// unlearn/philox.h and unlearn/smoothing.h that define the results (levels_below, the steps of
// certify_from_counts), so the paths agree bit for bit by construction. The lane loops are plain C++
// that GCC vectorizes for the ISA of the file that includes this header.
//
// Include it after the file's own ISA switch (#pragma GCC target), and the headers it includes before
// the switch: it is compiled once per path, and its internal linkage keeps the copies built for
// different ISAs apart (an inline function with external linkage, such as a std::min instantiated
// from a header first included after the switch, would be merged by the linker, which could hand
// AVX-512 code to any CPU).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "mc_kernel.h"
#include "unlearn/float_math.h"
#include "unlearn/philox.h"
#include "unlearn/smoothing.h"

// Marks a loop over the lanes of a group: kept whole so that GCC vectorizes it as a loop, rather
// than unrolled completely first (which leaves the pieces to the weaker straight-line vectorizer).
#define UNLEARN_LANE_LOOP _Pragma("GCC unroll 1")

namespace unlearn {
namespace cpu {
namespace {

// One group of kLanes consecutive elements: where it starts and each lane's draw thresholds
// (mc_thresholds' integer form, from the probabilities the caller computed). Lanes at or past
// `lanes` are padding: they read p = 0, count nothing and are neither stored nor counted.
template <int kLanes>
struct McGroup {
  // With k = word >> 8: class -1 iff k < neg_levels, class +1 iff k >= pos_from. pos_from is
  // max(pos_start, neg_levels), since +1 also needs "not -1" (draw_is_positive): one compare per draw.
  alignas(4 * kLanes) int32_t neg_levels[kLanes];  // aligned like a vector of the lanes
  alignas(4 * kLanes) int32_t pos_from[kLanes];
  alignas(4 * kLanes) int32_t finite[kLanes];  // 0 for a non-finite input (p NaN: thresholds {0, 2^24}, code and radius 0)
  uint64_t element0;  // global index of lane 0: the Philox stream of lane l is element0 + l
  int lanes;          // real elements, 1 to kLanes
};

// Class counts of each lane's n0 selection and n estimation draws.
template <int kLanes>
struct McGroupCounts {
  alignas(4 * kLanes) int32_t sel_neg[kLanes];
  alignas(4 * kLanes) int32_t sel_pos[kLanes];
  alignas(4 * kLanes) int32_t est_neg[kLanes];
  alignas(4 * kLanes) int32_t est_pos[kLanes];
};

// The thresholds of a group from kLanes probabilities of each class (padding lanes: p = 0).
template <int kLanes>
inline void group_thresholds(const float* p_neg, const float* p_pos, uint64_t element0, int lanes, McGroup<kLanes>& g) {
  g.element0 = element0;
  g.lanes = lanes;
  UNLEARN_LANE_LOOP
  for (int l = 0; l < kLanes; ++l) {
    const int32_t neg = static_cast<int32_t>(levels_below(p_neg[l]));  // levels_below(NaN) = 0
    const int32_t pos_start = static_cast<int32_t>(kUniformLevels - levels_below(p_pos[l]));
    g.neg_levels[l] = neg;
    g.pos_from[l] = std::max(pos_start, neg);
    g.finite[l] = p_neg[l] == p_neg[l];
  }
}

// Counts taken by comparing whole 32-bit words with thresholds * 256 (the x86 paths: it saves a shift
// per draw) miss one case: a threshold of 2^24 levels (every draw below it) wraps to 0. Fixed here:
// such a lane drew -1 every time (neg_levels = 2^24), or never +1 (pos_from = 2^24).
template <int kLanes>
inline void fix_wrapped_thresholds(const McGroup<kLanes>& g, const McDrawParams& p, McGroupCounts<kLanes>& __restrict c) {
  const int32_t all = static_cast<int32_t>(kUniformLevels), n0 = p.n0, n = p.n;
  UNLEARN_LANE_LOOP
  for (int l = 0; l < kLanes; ++l) {
    c.sel_neg[l] = g.neg_levels[l] == all ? n0 : c.sel_neg[l];
    c.est_neg[l] = g.neg_levels[l] == all ? n : c.est_neg[l];
    c.sel_pos[l] = g.pos_from[l] == all ? 0 : c.sel_pos[l];
    c.est_pos[l] = g.pos_from[l] == all ? 0 : c.est_pos[l];
  }
}

// The statistics of McSpanStats kept per lane over a span and reduced once at its end, so that a
// group adds to them lane by lane (no horizontal sums per group). A lane adds at most 1 per group,
// so 32 bits hold any span of fewer than 2^31 groups (the callers' spans are parallel chunks).
template <int kLanes>
struct McLaneStats {
  int32_t min_radius_bits[kLanes];
  int32_t abstained[kLanes], nonfinite[kLanes], below[kLanes];

  McLaneStats() {
    for (int l = 0; l < kLanes; ++l) {
      min_radius_bits[l] = 0x7f800000;  // +inf
      abstained[l] = nonfinite[l] = below[l] = 0;
    }
  }

  void add_to(McSpanStats& s) const {
    for (int l = 0; l < kLanes; ++l) {
      s.min_radius_bits = std::min(s.min_radius_bits, min_radius_bits[l]);
      s.abstained += abstained[l];
      s.nonfinite += nonfinite[l];
      s.below += below[l];
    }
  }
};

// CERTIFY's radius-table read, entry[l] = table[index[l]] (indices in [0, n]), as a lane loop. GCC's
// generic tuning compiles it to one load per lane; a path whose vector gather measured faster passes
// its own read to mc_span_groups (the same values, so the same bits).
struct LaneTableRead {
  template <int kLanes>
  void operator()(const float* table, const int32_t (&index)[kLanes], float (&entry)[kLanes]) const {
    UNLEARN_LANE_LOOP
    for (int l = 0; l < kLanes; ++l) entry[l] = table[index[l]];
  }
};

// CERTIFY (certify_from_counts, in its steps around the table read) for each lane, the stores of
// all kLanes codes and radii, and the statistics of the real lanes. The lane loops hold 32-bit
// values only, so GCC vectorizes them at full width (a byte-wide value in a loop shrinks the vectors
// it picks); the codes are narrowed to bytes in a loop of their own.
template <int kLanes, typename TableRead>
inline void certify_group(const McGroup<kLanes>& g, const McGroupCounts<kLanes>& c, const McDrawParams& p,
                          const TableRead& read_table, int8_t* codes, float* radii, McLaneStats<kLanes>& stats) {
  const int32_t n0 = p.n0, n = p.n;
  const float sigma = p.sigma, below_threshold = p.below_threshold;
  int32_t c_a[kLanes], k_a[kLanes];
  UNLEARN_LANE_LOOP
  for (int l = 0; l < kLanes; ++l) {
    const CertifyIndex i =
        certify_index(VoteCounts{c.sel_neg[l], c.sel_pos[l]}, n0, VoteCounts{c.est_neg[l], c.est_pos[l]}, n);
    c_a[l] = i.c_a;
    k_a[l] = i.k_a;
  }
  float entry[kLanes];
  read_table(p.radius_table, k_a, entry);
  int32_t code[kLanes];
  float radius[kLanes];
  UNLEARN_LANE_LOOP
  for (int l = 0; l < kLanes; ++l) {
    const int32_t finite = g.finite[l], real = l < g.lanes;  // padding lanes stay out of the statistics
    code[l] = finite ? certified_class(c_a[l], entry[l]) : 0;
    radius[l] = finite ? certified_radius(entry[l], sigma) : 0.0f;
    stats.abstained[l] += real & finite & abstains(entry[l]);
    stats.nonfinite[l] += real & (finite ^ 1);
    stats.below[l] += real & (radius[l] < below_threshold);
    // radii are >= 0, so their bit patterns order like the floats
    stats.min_radius_bits[l] = std::min(stats.min_radius_bits[l], real ? float_bits(radius[l]) : int32_t(0x7f800000));
  }
  std::memcpy(radii, radius, sizeof radius);
  UNLEARN_LANE_LOOP
  for (int l = 0; l < kLanes; ++l) codes[l] = static_cast<int8_t>(code[l]);
}

// A span in groups of kLanes elements, the last one ragged (read and written through padded copies):
// thresholds, count_group(const McGroup<kLanes>&, McGroupCounts<kLanes>&) (the path's draw loop),
// CERTIFY with read_table (LaneTableRead's signature).
template <int kLanes, typename CountGroup, typename TableRead = LaneTableRead>
inline void mc_span_groups(const float* p_neg, const float* p_pos, int64_t count, uint64_t global_begin,
                           const McDrawParams& p, int8_t* codes, float* radii, McSpanStats& stats,
                           CountGroup&& count_group, const TableRead& read_table = TableRead{}) {
  McLaneStats<kLanes> lane_stats;
  const auto group = [&](const float* pn, const float* pp, uint64_t element0, int lanes, int8_t* code, float* radius) {
    McGroup<kLanes> g;
    group_thresholds(pn, pp, element0, lanes, g);
    McGroupCounts<kLanes> c;
    count_group(static_cast<const McGroup<kLanes>&>(g), c);
    certify_group(g, c, p, read_table, code, radius, lane_stats);
  };
  int64_t base = 0;
  for (; base + kLanes <= count; base += kLanes)
    group(p_neg + base, p_pos + base, global_begin + static_cast<uint64_t>(base), kLanes, codes + base, radii + base);
  if (base < count) {  // the ragged tail through padded copies
    const int rest = static_cast<int>(count - base);
    float pn[kLanes] = {}, pp[kLanes] = {}, radius[kLanes];
    int8_t code[kLanes];
    std::memcpy(pn, p_neg + base, sizeof(float) * rest);
    std::memcpy(pp, p_pos + base, sizeof(float) * rest);
    group(pn, pp, global_begin + static_cast<uint64_t>(base), rest, code, radius);
    std::memcpy(codes + base, code, rest);
    std::memcpy(radii + base, radius, sizeof(float) * rest);
  }
  lane_stats.add_to(stats);
}

// The Philox blocks of an element's draws (block b: counter offset + b, draws 4b to 4b + 3) by phase.
// Draws [0, n0) select, [n0, n0 + n) estimate; a block lies wholly in one phase except the one
// holding draw n0 when n0 % 4 != 0 and a partial last one (the same block when both lie in it).
// Calls whole(first, last, estimation) for the runs of whole blocks of one phase, so a path can
// count them without per-draw checks, and split(block) for each split block, whose draws the path
// assigns with draw_phase.
enum class DrawPhase { kSelection, kEstimation, kNone };

inline DrawPhase draw_phase(uint64_t block, int q, const McDrawParams& p) {
  const uint64_t j = 4 * block + static_cast<uint64_t>(q);  // draw index of word q of the block
  const uint64_t n0 = static_cast<uint64_t>(p.n0), draws = n0 + static_cast<uint64_t>(p.n);
  return j < n0 ? DrawPhase::kSelection : (j < draws ? DrawPhase::kEstimation : DrawPhase::kNone);
}

template <typename Whole, typename Split>
inline void for_each_block_run(const McDrawParams& p, Whole&& whole, Split&& split) {
  const uint64_t n0 = static_cast<uint64_t>(p.n0), draws = n0 + static_cast<uint64_t>(p.n);
  const uint64_t est_first = (n0 + 3) / 4;                                   // first whole estimation block
  const uint64_t est_last = std::max(draws / 4, est_first);                  // end of the whole estimation blocks
  if (n0 / 4 > 0) whole(uint64_t(0), n0 / 4, false);
  if (est_last > est_first) whole(est_first, est_last, true);
  if (n0 % 4 != 0) split(n0 / 4);
  if (draws % 4 != 0 && !(n0 % 4 != 0 && draws / 4 == n0 / 4)) split(draws / 4);
}

}  // namespace
}  // namespace cpu
}  // namespace unlearn
