// CPU kernels of the selection family (schemas and contract in csrc/ops.cpp, per-element math in
// unlearn/select.h). All passes read the list in place through the chunk walker: no concatenated
// copy; the only extra memory is one histogram per worker.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <mutex>

#include "cpu_walk.h"
#include "per_isa_ops.h"
#include "unlearn/select.h"
#include "unlearn/select_checks.h"

#include "isa_target.h"  // from here on: this copy's ISA (isa.h)
#include "select_keys.h"

namespace unlearn {
namespace cpu {
namespace UNLEARN_ISA {
namespace {

constexpr int64_t kTile = kKeyTile;

// Calls f(key, nan, local_index) for the elements [lo, hi) of tensor t (global index g0 + i - lo).
template <typename T, typename F>
inline void for_each_key(const at::Tensor& scores, int mode, uint64_t seed, uint64_t offset, int64_t lo,
                         int64_t hi, int64_t g0, F&& f) {
  alignas(64) uint32_t keys[kTile];
  const T* data = key_source<T>(scores, mode);
  for (int64_t j0 = lo; j0 < hi; j0 += kTile) {
    const int64_t n = std::min(kTile, hi - j0);
    tile_keys<T>(data, mode, seed, offset, j0, n, g0 + (j0 - lo), keys);
    for (int64_t j = 0; j < n; ++j) f(keys[j], mode != kKeyRandom && key_is_nan(keys[j]), j0 + j);
  }
}

template <typename F>
inline void dispatch_scores(const FlatList& s, F&& f) {
  if (s.tensors.empty()) return f(float{});
  dispatch_float_type(s.tensors[0].scalar_type(), std::forward<F>(f));
}

at::Tensor select_histogram_cpu(at::TensorList scores_in, int64_t mode, int64_t seed, int64_t offset,
                                int64_t base, int64_t prefix, int64_t prefix_bits, int64_t digit_bits) {
  check_key_mode(mode);
  check_base(base);
  check_histogram_args(prefix, prefix_bits, digit_bits);
  const FlatList s = flatten_float_list(scores_in, "scores");
  const int64_t bins = int64_t(1) << digit_bits;
  at::Tensor out = at::zeros({bins + 1}, at::TensorOptions().dtype(at::kLong));
  int64_t* hist = out.data_ptr<int64_t>();
  const int prefix_shift = 32 - static_cast<int>(prefix_bits);  // 32 when there is no prefix
  const int digit_shift = prefix_shift - static_cast<int>(digit_bits);
  const uint64_t want = static_cast<uint64_t>(prefix), mask = static_cast<uint64_t>(bins - 1);
  // One histogram per worker, merged under a lock: integer counts, so the merge order is irrelevant.
  std::mutex merge;
  dispatch_scores(s, [&](auto tag) {
    using T = decltype(tag);
    ChunkQueue::run(chunk_count(s.offsets), [&](ChunkQueue& queue) {
      std::vector<int64_t> local(static_cast<size_t>(bins + 1), 0);
      int64_t* h = local.data();
      alignas(64) uint32_t keys[kTile];
      for (int64_t c; (c = queue.take()) >= 0;) {  // (body not re-indented, to keep the diff small)
      for_each_span(s.offsets, c * kChunk, std::min(s.total(), (c + 1) * kChunk),
                    [&](size_t t, int64_t lo, int64_t hi, int64_t g) {
                      const T* data = key_source<T>(s.tensors[t], static_cast<int>(mode));
                      for (int64_t j0 = lo; j0 < hi; j0 += kTile) {
                        const int64_t n = std::min(kTile, hi - j0);
                        tile_keys<T>(data, static_cast<int>(mode), as_u64(seed), as_u64(offset), j0, n,
                                     base + g + (j0 - lo), keys);
                        int64_t nans = 0;
                        if (mode != kKeyRandom)
                          for (int64_t j = 0; j < n; ++j) nans += key_is_nan(keys[j]);
                        h[bins] += nans;
                        if (nans == 0 && prefix_bits == 0) {  // the common first pass: no checks at all
                          for (int64_t j = 0; j < n; ++j) ++h[keys[j] >> digit_shift];
                          continue;
                        }
                        for (int64_t j = 0; j < n; ++j) {
                          const uint64_t k = keys[j];
                          if ((k >> prefix_shift) == want && (nans == 0 || !key_is_nan(keys[j])))
                            ++h[(k >> digit_shift) & mask];
                        }
                      }
                    });
      }
      std::lock_guard<std::mutex> lock(merge);
      for (int64_t b = 0; b <= bins; ++b) hist[b] += h[b];
    });
  });
  return out;
}

at::Tensor select_tie_boundary_cpu(at::TensorList scores_in, int64_t mode, int64_t seed, int64_t offset,
                                   int64_t base, int64_t key, int64_t needed) {
  check_key_mode(mode);
  check_base(base);
  TORCH_CHECK(needed >= 0, "unlearn_ext: needed must be >= 0, got ", needed);
  const FlatList s = flatten_float_list(scores_in, "scores");
  at::Tensor out = at::empty({}, at::TensorOptions().dtype(at::kLong));
  int64_t& boundary = *out.data_ptr<int64_t>();
  boundary = base + s.total();  // fewer ties than needed: all of them
  if (needed == 0) {
    boundary = base;
    return out;
  }
  const auto is_tie = [key](uint32_t k, bool nan) { return !nan && static_cast<int64_t>(k) == key; };
  dispatch_scores(s, [&](auto tag) {
    using T = decltype(tag);
    // Pass 1: ties per chunk.
    const std::vector<int64_t> counts =
        chunk_partials<int64_t>(s.offsets, [&](int64_t& n, size_t t, int64_t lo, int64_t hi, int64_t g) {
          for_each_key<T>(s.tensors[t], static_cast<int>(mode), as_u64(seed), as_u64(offset), lo, hi, base + g,
                          [&](uint32_t k, bool nan, int64_t) { n += is_tie(k, nan); });
        });
    // The chunk holding the needed-th tie, then a serial scan of that chunk alone.
    int64_t before = 0;
    for (size_t c = 0; c < counts.size(); ++c) {
      if (before + counts[c] < needed) {
        before += counts[c];
        continue;
      }
      const int64_t c0 = static_cast<int64_t>(c) * kChunk;
      bool done = false;
      for_each_span(s.offsets, c0, std::min(s.total(), c0 + kChunk), [&](size_t t, int64_t lo, int64_t hi, int64_t g) {
        if (done) return;
        for_each_key<T>(s.tensors[t], static_cast<int>(mode), as_u64(seed), as_u64(offset), lo, hi, base + g,
                        [&](uint32_t k, bool nan, int64_t i) {
                          if (done || !is_tie(k, nan)) return;
                          if (++before == needed) {
                            boundary = base + g + (i - lo) + 1;
                            done = true;
                          }
                        });
      });
      break;
    }
  });
  return out;
}

// Writes the action's new value into w[i] (global index `global`, for the noise stream). A reset
// never reads w: a load that misses the cache would stall the loop, a store does not.
template <typename P>
struct ActionWriter {
  int action;
  float alpha;
  uint64_t noise_seed, noise_offset;
  inline __attribute__((always_inline)) void operator()(P* w, const P* src, int64_t i, int64_t global) const {
    const float sv = src ? load_float(src[i]) : 0.0f;
    w[i] = store_as<P>(action == kActSet ? sv
                                         : apply_action(action, load_float(w[i]), sv, alpha, noise_seed, noise_offset,
                                                        static_cast<uint64_t>(global)));
  }
};

// Lanes of a 16-key block selected by (threshold, boundary): key > threshold, or key == threshold
// for the first `tie_lanes` lanes (those whose global index lies below the boundary). `ordered`:
// the lanes holding keys that take part in an order (NaN scores never do).
inline uint32_t selected_lanes(const uint32_t* keys, int valid, int64_t threshold, int tie_lanes, uint32_t ordered) {
  if (threshold > 0xffffffffLL) return 0;
  if (threshold < 0) return ordered;
  const uint32_t thr = static_cast<uint32_t>(threshold);
  uint32_t sel = thr == 0xffffffffu ? 0u : lanes_in(keys, valid, thr + 1, 0xffffffffu);
  if (tie_lanes > 0) sel |= lanes_in(keys, std::min(valid, tie_lanes), thr, thr);
  return sel & ordered;
}

inline void write_mask_lanes(bool* m, uint32_t sel, int valid) {
  for (int j = 0; j < valid; ++j) m[j] = (sel >> j) & 1u;
}

// The parameter lists of an apply as raw pointers per tensor (work: contiguous params).
template <typename P>
struct ApplyTargets {
  std::vector<at::Tensor>& work;
  const std::vector<at::Tensor>& source;
  at::TensorList masks;
  P* w(size_t t) const { return work[t].data_ptr<P>(); }
  const P* src(size_t t) const { return source.empty() ? nullptr : source[t].data_ptr<P>(); }
  bool* mask(size_t t) const { return masks.empty() ? nullptr : masks[t].data_ptr<bool>(); }
};

std::vector<at::Tensor> contiguous_sources(at::TensorList source_in) {
  std::vector<at::Tensor> source(source_in.begin(), source_in.end());
  for (auto& x : source) x = x.contiguous();
  return source;
}

// The key walk both apply passes share: the keys of elements [lo, hi) of tensor t (global index of
// lo: global_lo), built a tile at a time and handed over 16 at a time as
// group(keys, valid lanes, local index of keys[0], global index of keys[0]). Always inlined into
// the caller's span body: otherwise the group's by-reference captures are reloaded (and its
// counters stored) after every vector store, which may alias them.
template <typename T, typename Group>
inline __attribute__((always_inline)) void for_each_key_group(const FlatList& s, size_t t, int64_t lo, int64_t hi,
                                                              int64_t global_lo, int key_mode, uint64_t seed,
                                                              uint64_t offset, Group group) {
  alignas(64) uint32_t keys[kTile];
  const T* data = key_source<T>(s.tensors[t], key_mode);
  for (int64_t j0 = lo; j0 < hi; j0 += kTile) {
    const int64_t len = std::min(kTile, hi - j0);
    const int64_t g0 = global_lo + (j0 - lo);
    tile_keys<T>(data, key_mode, seed, offset, j0, len, g0, keys);
    for (int64_t b = 0; b < len; b += 16) group(keys + b, static_cast<int>(std::min<int64_t>(16, len - b)), j0 + b, g0 + b);
  }
}

at::Tensor select_apply_cpu(at::TensorList params, at::TensorList scores_in, at::TensorList source_in,
                            at::TensorList masks, int64_t mode, int64_t seed, int64_t offset, int64_t base,
                            int64_t threshold, int64_t boundary, int64_t action, double alpha, int64_t noise_seed,
                            int64_t noise_offset) {
  check_key_mode(mode);
  check_base(base);
  check_selection(threshold, boundary);
  check_action(action, alpha, source_in.size(), params.size());
  const bool shapes_only = mode == kKeyRandom && scores_in.empty();
  const FlatList s = check_apply_lists(params, shapes_only ? params : scores_in, source_in, masks);
  std::vector<at::Tensor> work = contiguous_work(params);
  const std::vector<at::Tensor> source = contiguous_sources(source_in);
  at::Tensor count = at::zeros({}, at::TensorOptions().dtype(at::kLong));
  if (params.empty()) return count;
  const int key_mode = static_cast<int>(mode);
  const uint32_t key_lo = ordered_key_min(key_mode), key_hi = ordered_key_max(key_mode);
  dispatch_float_type(params[0].scalar_type(), [&](auto ptag) {
    using P = decltype(ptag);
    const ActionWriter<P> write{static_cast<int>(action), static_cast<float>(alpha), as_u64(noise_seed),
                                as_u64(noise_offset)};
    const ApplyTargets<P> out{work, source, masks};
    dispatch_scores(s, [&](auto stag) {
      using T = decltype(stag);
      const std::vector<int64_t> counts =
          chunk_partials<int64_t>(s.offsets, [&](int64_t& n, size_t t, int64_t lo, int64_t hi, int64_t g) {
            P* w = out.w(t);
            const P* src = out.src(t);
            bool* m = out.mask(t);
            for_each_key_group<T>(s, t, lo, hi, base + g, key_mode, as_u64(seed), as_u64(offset),
                                  [&](const uint32_t* kb, int valid, int64_t j, int64_t gj) {
              // The tie rule "global index < boundary" as "the first tie_lanes lanes".
              const int tie_lanes = static_cast<int>(std::clamp<int64_t>(boundary - gj, 0, 16));
              const uint32_t ordered = lanes_in(kb, valid, key_lo, key_hi);
              const uint32_t sel = selected_lanes(kb, valid, threshold, tie_lanes, ordered);
              if (m) write_mask_lanes(m + j, sel, valid);
              n += lane_count(sel);
              for_each_lane(sel, [&](int l) { write(w, src, j + l, gj + l); });
            });
          });
      int64_t total = 0;
      for (int64_t n : counts) total += n;
      *count.data_ptr<int64_t>() = total;
    });
  });
  write_back(params, work);
  return count;
}

// ---- the fused two-pass top-K (DESIGN section 9: one histogram pass, then one pass that applies ----
// everything above the threshold bin and resolves that bin exactly)

constexpr int kBins = 1 << 16;        // the first radix digit of select_histogram_near
constexpr int64_t kSamples = 1 << 13;  // keys sampled to place the bracket
constexpr int64_t kMinSampled = 1 << 17;  // below this many elements one exact pass is cheap anyway
constexpr double kBracketSigmas = 6.0;    // half-width of the bracket in binomial standard deviations

struct Bracket {
  int64_t lo_bin = 0, hi_bin = kBins - 1;
};

// Bins [lo_bin, hi_bin] of the top 16 key bits that hold the k-th largest key unless a 6-sigma
// event happened: the keys of kSamples evenly spaced elements, ranked, give the k-th largest's
// rank among them +- 6 binomial standard deviations (plus 2). Evenly spaced samples are a
// stratified sample of the list (per-tensor scales are sampled in proportion). The bracket only
// decides which bins are counted one by one: a miss is detected by the caller (the k-th largest
// lands in a lumped bin) and costs a full histogram pass, never a wrong answer.
template <typename T>
Bracket sample_bracket(const FlatList& s, int mode, uint64_t seed, uint64_t offset, int64_t base, int64_t k) {
  const int64_t n = s.total();
  Bracket b;
  if (n < kMinSampled || k <= 0 || k >= n) return b;
  std::vector<uint32_t> keys;
  keys.reserve(static_cast<size_t>(kSamples));
  const uint32_t key_lo = ordered_key_min(mode), key_hi = ordered_key_max(mode);
  std::vector<const T*> data;
  for (const at::Tensor& x : s.tensors) data.push_back(key_source<T>(x, mode));
  size_t t = 0;
  for (int64_t i = 0; i < kSamples; ++i) {
    const int64_t g = static_cast<int64_t>((static_cast<double>(i) + 0.5) * static_cast<double>(n) / kSamples);
    while (s.offsets[t + 1] <= g) ++t;  // sample positions increase: walk the tensors once
    const uint32_t key = element_key<T>(data[t], mode, seed, offset, g - s.offsets[t], base + g);
    if (key >= key_lo && key <= key_hi) keys.push_back(key);
  }
  const int64_t m = static_cast<int64_t>(keys.size());
  if (m < kSamples / 2) return b;  // mostly NaN: the caller refuses the scores anyway
  const double q = static_cast<double>(k) / static_cast<double>(n);
  const double rank = q * static_cast<double>(m);
  const double margin = kBracketSigmas * std::sqrt(static_cast<double>(m) * q * (1.0 - q)) + 2.0;
  const int64_t hi_rank = static_cast<int64_t>(std::floor(rank - margin));  // 0 = the largest sampled key
  const int64_t lo_rank = static_cast<int64_t>(std::ceil(rank + margin));
  if (hi_rank >= 0) {
    std::nth_element(keys.begin(), keys.begin() + hi_rank, keys.end(), std::greater<uint32_t>());
    b.hi_bin = keys[static_cast<size_t>(hi_rank)] >> 16;
  }
  if (lo_rank < m) {
    std::nth_element(keys.begin(), keys.begin() + lo_rank, keys.end(), std::greater<uint32_t>());
    b.lo_bin = keys[static_cast<size_t>(lo_rank)] >> 16;
  }
  return b;
}

// Per-worker counts of the near histogram: only the bracket's bins (index: bin - lo_bin), since no
// other bin is ever counted one by one; a typical bracket spans tens of bins, so a worker neither
// allocates, zeroes nor merges 2^16 of them (uint32: a quarter of int64's cache footprint).
struct NearCounts {
  explicit NearCounts(const Bracket& b) : bins(static_cast<size_t>(b.hi_bin - b.lo_bin + 1), 0u) {}
  std::vector<uint32_t> bins;
  int64_t above = 0, nan = 0;
};

at::Tensor select_histogram_near_cpu(at::TensorList scores_in, int64_t mode, int64_t seed, int64_t offset,
                                     int64_t base, int64_t k) {
  check_key_mode(mode);
  check_base(base);
  TORCH_CHECK(k >= 0, "unlearn_ext: k must be >= 0, got ", k);
  const FlatList s = flatten_float_list(scores_in, "scores");
  at::Tensor out = at::zeros({kBins + 3}, at::TensorOptions().dtype(at::kLong));
  int64_t* h = out.data_ptr<int64_t>();
  const int key_mode = static_cast<int>(mode);
  const uint32_t key_lo = ordered_key_min(key_mode), key_hi = ordered_key_max(key_mode);
  Bracket br;
  int64_t above = 0, nan = 0;
  std::mutex merge;
  dispatch_scores(s, [&](auto tag) {
    using T = decltype(tag);
    br = sample_bracket<T>(s, key_mode, as_u64(seed), as_u64(offset), base, k);
    const uint32_t in_lo = static_cast<uint32_t>(br.lo_bin) << 16;
    const uint32_t in_hi = (static_cast<uint32_t>(br.hi_bin) << 16) | 0xffffu;
    ChunkQueue::run(chunk_count(s.offsets), [&](ChunkQueue& queue) {
      NearCounts local(br);
      uint32_t* bins = local.bins.data();
      const uint32_t first_bin = static_cast<uint32_t>(br.lo_bin);
      int64_t since_flush = 0;
      const auto flush = [&] {
        std::lock_guard<std::mutex> lock(merge);
        for (size_t b = 0; b < local.bins.size(); ++b) h[br.lo_bin + static_cast<int64_t>(b)] += bins[b];
        above += local.above;
        nan += local.nan;
        std::fill(local.bins.begin(), local.bins.end(), 0u);
        local.above = local.nan = 0;
      };
      for (int64_t c; (c = queue.take()) >= 0;) {
        for_each_span(s.offsets, c * kChunk, std::min(s.total(), (c + 1) * kChunk),
                      [&](size_t t, int64_t lo, int64_t hi, int64_t g) {
                        // Everything the block loop reads or counts lives in this body's locals: the
                        // vector stores of compress_keys may alias anything reached through a
                        // capture, so captured bounds would be reloaded and re-broadcast, and
                        // captured counters stored, on every 16-key block.
                        const uint32_t o_lo = key_lo, o_hi = key_hi, b_lo = in_lo, b_hi = in_hi, b0 = first_bin;
                        uint32_t* const counts = bins;
                        alignas(64) uint32_t keys[kTile];
                        // The span's keys inside the bracket (a span is at most one chunk), counted
                        // after its scan: one loop over them per span, not one per tile.
                        thread_local std::vector<uint32_t> inside_keys(static_cast<size_t>(kChunk + 16));
                        uint32_t* const inside = inside_keys.data();
                        int64_t n_nan = 0, n_above = 0, n_inside = 0;
                        const T* data = key_source<T>(s.tensors[t], key_mode);
                        for (int64_t j0 = lo; j0 < hi; j0 += kTile) {
                          const int64_t len = std::min(kTile, hi - j0);
                          tile_keys<T>(data, key_mode, as_u64(seed), as_u64(offset), j0, len,
                                       base + g + (j0 - lo), keys);
                          for (int64_t b = 0; b < len; b += 16) {
                            const uint32_t* kb = keys + b;
                            const int valid = static_cast<int>(std::min<int64_t>(16, len - b));
                            const BlockLanes lanes = classify_block(kb, valid, o_lo, o_hi, b_lo, b_hi);
                            n_nan += valid - lane_count(lanes.ordered);
                            n_above += lane_count(lanes.above);
                            n_inside += compress_keys(kb, lanes.inside, inside + n_inside);
                          }
                        }
                        for (int64_t j = 0; j < n_inside; ++j) ++counts[(inside[j] >> 16) - b0];
                        local.nan += n_nan;
                        local.above += n_above;
                      });
        // uint32 bins cannot overflow within 2^31 elements.
        if ((since_flush += kChunk) >= (int64_t(1) << 31)) {
          flush();
          since_flush = 0;
        }
      }
      flush();
    });
  });
  // Counts outside the bracket, lumped into the bins just above and below it (so cumulative counts
  // from the top stay exact at every bin boundary inside the bracket).
  int64_t inside = 0;
  for (int64_t b = br.lo_bin; b <= br.hi_bin; ++b) inside += h[b];
  if (br.hi_bin < kBins - 1) h[br.hi_bin + 1] = above;
  if (br.lo_bin > 0) h[br.lo_bin - 1] = s.total() - nan - above - inside;
  h[kBins] = nan;
  h[kBins + 1] = br.lo_bin;
  h[kBins + 2] = br.hi_bin;
  return out;
}

// A key of the boundary bin, remembered by the fused apply pass for the exact resolution.
struct Candidate {
  uint32_t key;
  uint32_t tensor;
  int64_t local;
};

struct ApplyPartial {
  int64_t count = 0;
  std::vector<Candidate> candidates;
};

at::Tensor select_apply_bin_cpu(at::TensorList params, at::TensorList scores_in, at::TensorList source_in,
                                at::TensorList masks, int64_t mode, int64_t seed, int64_t offset, int64_t base,
                                int64_t prefix, int64_t prefix_bits, int64_t needed, int64_t action, double alpha,
                                int64_t noise_seed, int64_t noise_offset) {
  check_key_mode(mode);
  check_base(base);
  check_bin_args(prefix, prefix_bits, needed);
  check_action(action, alpha, source_in.size(), params.size());
  const bool shapes_only = mode == kKeyRandom && scores_in.empty();
  const FlatList s = check_apply_lists(params, shapes_only ? params : scores_in, source_in, masks);
  std::vector<at::Tensor> work = contiguous_work(params);
  const std::vector<at::Tensor> source = contiguous_sources(source_in);
  const int shift = 32 - static_cast<int>(prefix_bits);
  const uint32_t bin_lo = static_cast<uint32_t>(static_cast<uint64_t>(prefix) << shift);
  const uint32_t bin_hi = static_cast<uint32_t>(((static_cast<uint64_t>(prefix) + 1) << shift) - 1);
  const int key_mode = static_cast<int>(mode);
  const uint32_t key_lo = ordered_key_min(key_mode), key_hi = ordered_key_max(key_mode);
  int64_t count = 0, threshold = bin_hi, boundary = 0;  // nothing taken from the bin: key > bin_hi
  if (!params.empty()) {
    dispatch_float_type(params[0].scalar_type(), [&](auto ptag) {
      using P = decltype(ptag);
      const ActionWriter<P> write{static_cast<int>(action), static_cast<float>(alpha), as_u64(noise_seed),
                                  as_u64(noise_offset)};
      const ApplyTargets<P> out{work, source, masks};
      dispatch_scores(s, [&](auto stag) {
        using T = decltype(stag);
        // Pass: apply every key above the bin, remember the bin's keys (in global index order).
        std::vector<ApplyPartial> parts = chunk_partials<ApplyPartial>(
            s.offsets, [&](ApplyPartial& part, size_t t, int64_t lo, int64_t hi, int64_t g) {
              P* w = out.w(t);
              const P* src = out.src(t);
              bool* m = out.mask(t);
              // The span's selected elements (offsets from lo; a span is at most one chunk), written
              // after its scan: see compress_keys for why not inside it.
              thread_local std::vector<int32_t> picks(static_cast<size_t>(kChunk + 16));
              int32_t* const pick = picks.data();
              int64_t n_picks = 0;
              // Bounds as locals: read through captures they would be reloaded after every vector
              // store (which may alias them).
              const uint32_t o_lo = key_lo, o_hi = key_hi, b_lo = bin_lo, b_hi = bin_hi;
              for_each_key_group<T>(s, t, lo, hi, base + g, key_mode, as_u64(seed), as_u64(offset),
                                    [&](const uint32_t* kb, int valid, int64_t j, int64_t) {
                const BlockLanes lanes = classify_block(kb, valid, o_lo, o_hi, b_lo, b_hi);
                const uint32_t sel = lanes.above, in_bin = lanes.inside;
                if (m) write_mask_lanes(m + j, sel, valid);
                n_picks += compress_lane_indices(static_cast<int32_t>(j - lo), sel, pick + n_picks);
                for_each_lane(in_bin, [&](int l) { part.candidates.push_back({kb[l], static_cast<uint32_t>(t), j + l}); });
              });
              part.count += n_picks;
              const int64_t g_lo = base + g;
              for (int64_t q = 0; q < n_picks; ++q) write(w, src, lo + pick[q], g_lo + pick[q]);
            });
        std::vector<Candidate> cand;
        size_t total = 0;
        for (const auto& p : parts) total += p.candidates.size();
        cand.reserve(total);
        for (auto& p : parts) {
          count += p.count;
          cand.insert(cand.end(), p.candidates.begin(), p.candidates.end());
          std::vector<Candidate>().swap(p.candidates);
        }
        // Resolution: the `take` largest keys of the bin, ties by lower global index. In linear time
        // (this part runs serially, and a stable sort of the candidates is O(n log n)): the take-th
        // largest key T by nth_element on a copy of the keys, then one walk of the candidates, which
        // are in global index order, taking every key above T and the first `take - above` equal to T.
        const int64_t take = std::min<int64_t>(needed, static_cast<int64_t>(cand.size()));
        if (take == 0) return;
        std::vector<uint32_t> keys(cand.size());
        for (size_t i = 0; i < cand.size(); ++i) keys[i] = cand[i].key;
        std::nth_element(keys.begin(), keys.begin() + (take - 1), keys.end(), std::greater<uint32_t>());
        const uint32_t t_key = keys[static_cast<size_t>(take - 1)];
        int64_t above = 0, ties = 0;
        for (const Candidate& c : cand) {
          above += c.key > t_key;
          ties += c.key == t_key;
        }
        const int64_t ties_needed = take - above;  // >= 1: T itself is among the take largest
        threshold = t_key;
        int64_t ties_taken = 0;
        for (const Candidate& c : cand) {
          if (c.key < t_key || (c.key == t_key && ties_taken == ties_needed)) continue;
          if (c.key == t_key && ++ties_taken == ties_needed && ties_needed < ties)
            boundary = base + s.offsets[c.tensor] + c.local + 1;  // the last tie taken
          write(out.w(c.tensor), out.src(c.tensor), c.local, base + s.offsets[c.tensor] + c.local);
          if (bool* m = out.mask(c.tensor)) m[c.local] = true;
        }
        if (ties_needed == ties) boundary = std::numeric_limits<int64_t>::max();
        count += take;
      });
    });
  }
  write_back(params, work);
  return at::tensor({count, threshold, boundary}, at::TensorOptions().dtype(at::kLong));
}

struct SumSq {
  double s = 0.0;
  void merge(const SumSq& o) { s += o.s; }
};

at::Tensor select_mask_grad_cpu(at::TensorList grads, at::TensorList scores_in, int64_t mode, int64_t seed,
                                int64_t offset, int64_t base, int64_t threshold, int64_t boundary) {
  check_key_mode(mode);
  check_base(base);
  check_selection(threshold, boundary);
  const FlatList s = check_apply_lists(grads, scores_in, {}, {});
  std::vector<at::Tensor> work = contiguous_work(grads);
  at::Tensor out = at::zeros({}, at::TensorOptions().dtype(at::kDouble));
  if (grads.empty()) return out;
  dispatch_float_type(grads[0].scalar_type(), [&](auto gtag) {
    using G = decltype(gtag);
    dispatch_scores(s, [&](auto stag) {
      using T = decltype(stag);
      const SumSq all = parallel_over_list<SumSq>(s.offsets, [&](SumSq& p, size_t t, int64_t lo, int64_t hi, int64_t g) {
        G* x = work[t].data_ptr<G>();
        for_each_key<T>(s.tensors[t], static_cast<int>(mode), as_u64(seed), as_u64(offset), lo, hi, base + g,
                        [&](uint32_t k, bool nan, int64_t i) {
                          if (!nan && is_selected(k, base + g + (i - lo), threshold, boundary)) {
                            const double v = load_float(x[i]);
                            p.s += v * v;
                          } else {
                            x[i] = store_as<G>(0.0f);
                          }
                        });
      });
      *out.data_ptr<double>() = all.s;
    });
  });
  write_back(grads, work);
  return out;
}

}  // namespace

#define UNLEARN_SELECT_OPS(X)                               \
  X("select_histogram", select_histogram_cpu)               \
  X("select_tie_boundary", select_tie_boundary_cpu)         \
  X("select_apply_", select_apply_cpu)                      \
  X("select_mask_grad_", select_mask_grad_cpu)              \
  X("select_histogram_near", select_histogram_near_cpu)     \
  X("select_apply_bin_", select_apply_bin_cpu)

}  // namespace UNLEARN_ISA
}  // namespace cpu
}  // namespace unlearn

#include "isa_target_end.h"

// Exported by every copy, registered once by the scalar copy (per_isa_ops.h).
UNLEARN_PER_ISA_OPS(UNLEARN_SELECT_OPS)
