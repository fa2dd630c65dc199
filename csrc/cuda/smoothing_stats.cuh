// The smoothing family's statistics on CUDA: every gradient walk of smoothing_cuda.cu also reports
// the smallest certified radius and three counts (abstained, non-finite, radius below count_below).
// Each thread keeps its own BlockStats, the thread block reduces them and adds the result to the
// outputs with one atomic each. The walk itself is the generic one (cuda_walk.cuh: block_unit).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "cuda_walk.cuh"

namespace unlearn {
namespace cuda {

struct BlockStats {
  int32_t min_radius_bits;
  unsigned long long abstained, nonfinite, below;
};

__device__ __forceinline__ int32_t radius_bits(float r) { return __float_as_int(r); }

// Reduces per-thread statistics over the block and adds them to the outputs (one atomic each).
__device__ __forceinline__ void reduce_block_stats(BlockStats s, float* min_radius, int64_t* counts) {
  __shared__ int32_t s_min[kWarps];
  __shared__ unsigned long long s_cnt[3][kWarps];
  for (int delta = 16; delta > 0; delta >>= 1) {
    s.min_radius_bits = min(s.min_radius_bits, __shfl_down_sync(0xffffffffu, s.min_radius_bits, delta));
    s.abstained += __shfl_down_sync(0xffffffffu, s.abstained, delta);
    s.nonfinite += __shfl_down_sync(0xffffffffu, s.nonfinite, delta);
    s.below += __shfl_down_sync(0xffffffffu, s.below, delta);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    s_min[warp] = s.min_radius_bits;
    s_cnt[0][warp] = s.abstained;
    s_cnt[1][warp] = s.nonfinite;
    s_cnt[2][warp] = s.below;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int32_t m = s_min[0];
    unsigned long long a = 0, b = 0, c = 0;
    for (int w = 0; w < kWarps; ++w) {
      m = min(m, s_min[w]);
      a += s_cnt[0][w];
      b += s_cnt[1][w];
      c += s_cnt[2][w];
    }
    // Radii are >= 0, so the integer order of their bit patterns is their float order.
    atomicMin(reinterpret_cast<int*>(min_radius), m);
    auto* cnt = reinterpret_cast<unsigned long long*>(counts);
    if (a) atomicAdd(cnt + 0, a);
    if (b) atomicAdd(cnt + 1, b);
    if (c) atomicAdd(cnt + 2, c);
  }
}

// Element walk with statistics: op(view, tensor, local_index, global_index, stats) for every
// element, one unit of kChunk elements per thread block, the block's statistics reduced into
// min_radius / counts. With skip_if_positive, the whole launch does nothing once that device
// counter is > 0 (the non-finite pre-scan of a step), without a host sync.
template <typename Op>
__global__ void __launch_bounds__(kThreads) stats_elements_kernel(ListView view, Op op, float* min_radius,
                                                                  int64_t* counts, const int64_t* skip_if_positive) {
  if (skip_if_positive != nullptr && *skip_if_positive > 0) return;
  const Unit u = block_unit(view);
  const int64_t base = view.offset(u.t);
  BlockStats s{0x7f800000, 0, 0, 0};
  for (int64_t i = u.begin + threadIdx.x; i < u.end; i += kThreads) op(view, u.t, i, base + i, s);
  reduce_block_stats(s, min_radius, counts);
}

// The outputs (min_radius = +inf, counts = 0) the walks reduce into.
inline std::tuple<at::Tensor, at::Tensor> new_stats(const at::Device& device) {
  const auto opts = at::TensorOptions().device(device);
  return {at::full({}, std::numeric_limits<float>::infinity(), opts.dtype(at::kFloat)),
          at::zeros({3}, opts.dtype(at::kLong))};
}

// Launches stats_elements_kernel over a list packed with unit kChunk.
template <typename Op>
inline void elements_with_stats(ListLaunch& launch, const ListView& v, const Op& op, const at::Tensor& min_radius,
                                const at::Tensor& counts, const int64_t* skip_if_positive = nullptr) {
  TORCH_INTERNAL_ASSERT(v.unit == kChunk);
  launch.per_block(v, stats_elements_kernel<Op>, op, min_radius.data_ptr<float>(), counts.data_ptr<int64_t>(),
                   skip_if_positive);
}

}  // namespace cuda
}  // namespace unlearn
