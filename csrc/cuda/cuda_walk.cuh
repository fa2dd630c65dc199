// How the CUDA kernels walk a tensor list: one launch per op. The host packs per-tensor pointers,
// the running offsets (global element index = offsets[t] + local index) and a chunk table into one
// int64 tensor; thread block c processes chunk c (kChunk elements of one tensor), reduces its
// statistics in shared memory and adds them to the outputs with one atomic per block.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "unlearn/elementwise.h"
#include "unlearn/tensor_list.h"

namespace unlearn {
namespace cuda {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 4096;
constexpr int kPointerArrays = 4;

// Device view of the packed metadata.
struct ListView {
  const int64_t* meta;
  int tensors;
  int64_t chunks;

  __device__ __forceinline__ void* ptr(int array, int t) const {
    return reinterpret_cast<void*>(meta[array * tensors + t]);
  }
  __device__ __forceinline__ int64_t offset(int t) const { return meta[kPointerArrays * tensors + t]; }
  __device__ __forceinline__ int64_t numel(int t) const { return offset(t + 1) - offset(t); }
  __device__ __forceinline__ int chunk_tensor(int64_t c) const {
    return static_cast<int>(meta[(kPointerArrays + 1) * tensors + 1 + c]);
  }
  __device__ __forceinline__ int64_t chunk_start(int64_t c) const {
    return meta[(kPointerArrays + 1) * tensors + 1 + chunks + c];
  }
};

// Packs up to kPointerArrays parallel lists of tensors and copies the metadata to the device.
// The walk (offsets, chunks) is sized by the FIRST list, so it must hold one element per
// coordinate. `keep` holds the device tensor alive for the launch. The copy from pageable memory
// synchronizes the host with the stream (pinned staging would avoid that; not done yet).
inline ListView pack_lists(const std::vector<std::vector<at::Tensor>>& arrays, const at::Device& device,
                           at::Tensor& keep) {
  const int tensors = static_cast<int>(arrays[0].size());
  std::vector<int64_t> offsets{0};
  std::vector<int64_t> chunk_tensor, chunk_start;
  for (int t = 0; t < tensors; ++t) {
    const int64_t n = arrays[0][t].numel();
    offsets.push_back(offsets.back() + n);
    for (int64_t s = 0; s < n; s += kChunk) {
      chunk_tensor.push_back(t);
      chunk_start.push_back(s);
    }
  }
  const int64_t chunks = static_cast<int64_t>(chunk_tensor.size());
  std::vector<int64_t> meta;
  meta.reserve((kPointerArrays + 1) * tensors + 1 + 2 * chunks);
  for (int a = 0; a < kPointerArrays; ++a)
    for (int t = 0; t < tensors; ++t)
      meta.push_back(a < static_cast<int>(arrays.size()) && arrays[a][t].defined()
                         ? reinterpret_cast<int64_t>(arrays[a][t].data_ptr())
                         : 0);
  meta.insert(meta.end(), offsets.begin(), offsets.end());
  meta.insert(meta.end(), chunk_tensor.begin(), chunk_tensor.end());
  meta.insert(meta.end(), chunk_start.begin(), chunk_start.end());
  keep = at::tensor(meta, at::TensorOptions().dtype(at::kLong)).to(device);
  return ListView{keep.data_ptr<int64_t>(), tensors, chunks};
}

struct BlockStats {
  int32_t min_radius_bits;
  unsigned long long abstained, nonfinite, below;
};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(c10::Half v) { return static_cast<float>(v); }
__device__ __forceinline__ float to_float(c10::BFloat16 v) { return static_cast<float>(v); }

__device__ __forceinline__ int32_t radius_bits(float r) { return __float_as_int(r); }

// Reduces per-thread statistics over the block and adds them to the outputs (one atomic each).
__device__ __forceinline__ void reduce_block_stats(BlockStats s, float* min_radius, int64_t* counts) {
  __shared__ int32_t s_min[kThreads / 32];
  __shared__ unsigned long long s_cnt[3][kThreads / 32];
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
    for (int w = 0; w < kThreads / 32; ++w) {
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

// Runs op(view, tensor, local_index, global_index, stats) over every element, one block per chunk.
// With skip_if_positive, the whole launch does nothing once that device counter is > 0 (the
// non-finite pre-scan of a step), without a host synchronization.
template <typename Op>
__global__ void __launch_bounds__(kThreads) list_kernel(ListView view, Op op, float* min_radius,
                                                        int64_t* counts, const int64_t* skip_if_positive) {
  if (skip_if_positive != nullptr && *skip_if_positive > 0) return;
  const int64_t c = blockIdx.x;
  const int t = view.chunk_tensor(c);
  const int64_t start = view.chunk_start(c);
  const int64_t end = min(start + kChunk, view.numel(t));
  BlockStats s{0x7f800000, 0, 0, 0};
  for (int64_t i = start + threadIdx.x; i < end; i += kThreads) op(view, t, i, view.offset(t) + i, s);
  if (min_radius != nullptr) reduce_block_stats(s, min_radius, counts);
}

template <typename Op>
inline void launch_list(const ListView& view, const Op& op, float* min_radius, int64_t* counts,
                        const int64_t* skip_if_positive = nullptr) {
  if (view.chunks == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  list_kernel<<<static_cast<unsigned>(view.chunks), kThreads, 0, stream>>>(view, op, min_radius, counts,
                                                                          skip_if_positive);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

inline std::tuple<at::Tensor, at::Tensor> new_stats(const at::Device& device) {
  const auto opts = at::TensorOptions().device(device);
  return {at::full({}, std::numeric_limits<float>::infinity(), opts.dtype(at::kFloat)),
          at::zeros({3}, opts.dtype(at::kLong))};
}

}  // namespace cuda
}  // namespace unlearn
