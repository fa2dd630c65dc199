// CPU kernels of the selection family (schemas and contract in csrc/ops.cpp, per-element math in
// unlearn/select.h). All passes read the list in place through the chunk walker: no concatenated
// copy; the only extra memory is one histogram per worker.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <mutex>

#include "cpu_walk.h"
#include "unlearn/select.h"
#include "unlearn/select_checks.h"

namespace unlearn {
namespace cpu {
namespace {

constexpr int64_t kTile = 256;  // keys are computed a tile at a time (a vectorized loop), then consumed

// Keys of elements [lo, lo + n) of tensor t into out (global index of element lo: g).
template <typename T>
inline void tile_keys(const at::Tensor& scores, int mode, uint64_t seed, uint64_t offset, int64_t lo, int64_t n,
                      int64_t g, uint32_t* out) {
  if (mode == kKeyRandom) {
    for (int64_t j = 0; j < n; ++j) out[j] = random_key(seed, offset, static_cast<uint64_t>(g + j));
    return;
  }
  const T* v = scores.data_ptr<T>() + lo;
  if (mode == kKeyAbs) {
    for (int64_t j = 0; j < n; ++j) out[j] = order_key_abs(load_float(v[j]));
  } else {
    for (int64_t j = 0; j < n; ++j) out[j] = order_key(load_float(v[j]));
  }
}

// Calls f(key, nan, local_index) for the elements [lo, hi) of tensor t (global index g0 + i - lo).
template <typename T, typename F>
inline void for_each_key(const at::Tensor& scores, int mode, uint64_t seed, uint64_t offset, int64_t lo,
                         int64_t hi, int64_t g0, F&& f) {
  uint32_t keys[kTile];
  for (int64_t j0 = lo; j0 < hi; j0 += kTile) {
    const int64_t n = std::min(kTile, hi - j0);
    tile_keys<T>(scores, mode, seed, offset, j0, n, g0 + (j0 - lo), keys);
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
  const int64_t chunks = chunk_count(s.offsets);
  const int64_t grain = std::max<int64_t>(1, (chunks + at::get_num_threads() - 1) / at::get_num_threads());
  std::mutex merge;
  dispatch_scores(s, [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, chunks, grain, [&](int64_t c0, int64_t c1) {
      std::vector<int64_t> local(static_cast<size_t>(bins + 1), 0);
      int64_t* h = local.data();
      uint32_t keys[kTile];
      for_each_span(s.offsets, c0 * kChunk, std::min(s.total(), c1 * kChunk),
                    [&](size_t t, int64_t lo, int64_t hi, int64_t g) {
                      for (int64_t j0 = lo; j0 < hi; j0 += kTile) {
                        const int64_t n = std::min(kTile, hi - j0);
                        tile_keys<T>(s.tensors[t], static_cast<int>(mode), as_u64(seed), as_u64(offset), j0, n,
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
  std::vector<at::Tensor> source(source_in.begin(), source_in.end());
  for (auto& x : source) x = x.contiguous();
  const float a = static_cast<float>(alpha);
  at::Tensor count = at::zeros({}, at::TensorOptions().dtype(at::kLong));
  if (params.empty()) return count;
  dispatch_float_type(params[0].scalar_type(), [&](auto ptag) {
    using P = decltype(ptag);
    dispatch_scores(s, [&](auto stag) {
      using T = decltype(stag);
      const std::vector<int64_t> counts =
          chunk_partials<int64_t>(s.offsets, [&](int64_t& n, size_t t, int64_t lo, int64_t hi, int64_t g) {
            P* w = work[t].data_ptr<P>();
            const P* src = source.empty() ? nullptr : source[t].data_ptr<P>();
            bool* m = masks.empty() ? nullptr : masks[t].data_ptr<bool>();
            uint32_t keys[kTile];
            uint8_t sel[kTile];
            for (int64_t j0 = lo; j0 < hi; j0 += kTile) {
              const int64_t len = std::min(kTile, hi - j0);
              const int64_t g0 = base + g + (j0 - lo);
              tile_keys<T>(s.tensors[t], static_cast<int>(mode), as_u64(seed), as_u64(offset), j0, len, g0, keys);
              // Branch-free flags in 32-bit lanes (a vectorized loop), then a loop that is nearly always
              // skipped. threshold in [-1, 2^32] as a uint32 with the two ends decided per tile; the
              // tie rule "global index < boundary" as "j < lim" with lim clamped to the tile.
              const int64_t lim64 = std::min<int64_t>(len, std::max<int64_t>(0, boundary - g0));
              const int32_t lim = static_cast<int32_t>(lim64);
              // Keys outside [key(-inf), key(+inf)] are NaN scores (never selected); random keys use
              // the full range. Each flag loop is a plain 32-bit/8-bit lane loop (GCC vectorizes it).
              const uint32_t key_lo = mode == kKeyRandom ? 0u : 0x007fffffu;
              const uint32_t key_hi = mode == kKeyRandom ? 0xffffffffu : 0xff800000u;
              const int32_t ilen = static_cast<int32_t>(len);
              if (threshold > 0xffffffffLL) {
                for (int32_t j = 0; j < ilen; ++j) sel[j] = 0;
              } else if (threshold < 0) {
                for (int32_t j = 0; j < ilen; ++j) sel[j] = 1;
              } else {
                const uint32_t thr = static_cast<uint32_t>(threshold);
                for (int32_t j = 0; j < ilen; ++j) {
                  const uint32_t k = keys[j];
                  sel[j] = static_cast<uint8_t>((k > thr) | ((k == thr) & (j < lim)));
                }
              }
              for (int32_t j = 0; j < ilen; ++j) {
                const uint32_t k = keys[j];
                sel[j] &= static_cast<uint8_t>((k >= key_lo) & (k <= key_hi));
              }
              uint32_t hits = 0;
              for (int32_t j = 0; j < ilen; ++j) hits += sel[j];
              const bool any = hits != 0;
              if (m)
                for (int64_t j = 0; j < len; ++j) m[j0 + j] = sel[j] != 0;
              if (!any) continue;
              n += hits;
              // Visit only the selected entries: 8 flags at a time, skipping all-zero groups (at K = 1%
              // most groups are empty, and a branch per element would cost as much as the whole pass).
              for (int64_t j8 = 0; j8 < len; j8 += 8) {
                uint64_t group = 0;
                std::memcpy(&group, sel + j8, static_cast<size_t>(std::min<int64_t>(8, len - j8)));
                if (group == 0) continue;
                for (int64_t j = j8; j < std::min<int64_t>(j8 + 8, len); ++j) {
                  if (!sel[j]) continue;
                  const int64_t i = j0 + j;
                  const float sv = src ? load_float(src[i]) : 0.0f;
                  // A reset never reads w: a load that misses the cache would stall the loop, a store
                  // does not.
                  w[i] = store_as<P>(action == kActSet
                                         ? sv
                                         : apply_action(static_cast<int>(action), load_float(w[i]), sv, a,
                                                        as_u64(noise_seed), as_u64(noise_offset),
                                                        static_cast<uint64_t>(g0 + j)));
                }
              }
            }
          });
      int64_t total = 0;
      for (int64_t n : counts) total += n;
      *count.data_ptr<int64_t>() = total;
    });
  });
  write_back(params, work);
  return count;
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

TORCH_LIBRARY_IMPL(unlearn_ext, CPU, m) {
  m.impl("select_histogram", &select_histogram_cpu);
  m.impl("select_tie_boundary", &select_tie_boundary_cpu);
  m.impl("select_apply_", &select_apply_cpu);
  m.impl("select_mask_grad_", &select_mask_grad_cpu);
}

}  // namespace cpu
}  // namespace unlearn
