// How the CPU kernels walk a tensor list: fixed chunks of the global index range run in parallel
// (at::parallel_for), each chunk keeps its own partial statistics, and the partials are combined in
// chunk order afterwards so results do not depend on the thread count.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "unlearn/tensor_list.h"

#if defined(__GNUC__) && !defined(__clang__)
#define UE_CPU_UNROLL _Pragma("GCC unroll 16")
#else
#define UE_CPU_UNROLL _Pragma("unroll")
#endif

namespace unlearn {
namespace cpu {

constexpr int64_t kChunk = 1 << 15;  // elements per parallel task

// Partial statistics of one chunk. The minimum radius is kept as the bit pattern of a
// non-negative float, whose integer order equals its float order and whose min-reduction
// vectorizes without -ffast-math.
struct Stats {
  int32_t min_radius_bits = 0x7f800000;  // +inf
  int64_t abstained = 0;
  int64_t nonfinite = 0;
  int64_t below = 0;

  void merge(const Stats& o) {
    min_radius_bits = std::min(min_radius_bits, o.min_radius_bits);
    abstained += o.abstained;
    nonfinite += o.nonfinite;
    below += o.below;
  }
};

inline int32_t float_bits(float f) {
  int32_t b;
  std::memcpy(&b, &f, sizeof(b));
  return b;
}

inline float bits_float(int32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof(f));
  return f;
}

inline float load_float(float v) { return v; }
inline float load_float(c10::Half v) { return static_cast<float>(v); }
inline float load_float(c10::BFloat16 v) { return static_cast<float>(v); }

template <typename T>
inline T store_as(float v) { return static_cast<T>(v); }

// Runs body(chunk_stats, tensor_index, local_begin, local_end, global_begin) over every span of the
// list, in parallel chunks, and returns the combined statistics.
template <typename Body>
inline Stats parallel_over_list(const std::vector<int64_t>& offsets, Body&& body) {
  const int64_t total = offsets.back();
  const int64_t chunks = (total + kChunk - 1) / kChunk;
  std::vector<Stats> partial(static_cast<size_t>(chunks));
  at::parallel_for(0, chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      Stats& s = partial[static_cast<size_t>(c)];
      for_each_span(offsets, c * kChunk, std::min(total, (c + 1) * kChunk),
                    [&](size_t t, int64_t lo, int64_t hi, int64_t g) { body(s, t, lo, hi, g); });
    }
  });
  Stats all;
  for (const auto& s : partial) all.merge(s);
  return all;
}

inline std::tuple<at::Tensor, at::Tensor> stats_tensors(const Stats& s, const at::TensorOptions& opts) {
  at::Tensor min_radius = at::empty({}, opts.dtype(at::kFloat));
  min_radius.fill_(bits_float(s.min_radius_bits));
  at::Tensor counts = at::empty({3}, opts.dtype(at::kLong));
  int64_t* c = counts.data_ptr<int64_t>();
  c[0] = s.abstained;
  c[1] = s.nonfinite;
  c[2] = s.below;
  return {min_radius, counts};
}

}  // namespace cpu
}  // namespace unlearn
