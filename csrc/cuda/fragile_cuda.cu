// CUDA kernel of fragile_compact (see csrc/cpu/fragile_cpu.cpp for the contract). Thread block c
// owns chunk c: unit c of the element walk (cuda_walk.cuh: kChunk elements of one tensor). Launch
// 1 counts each chunk's fragile entries; an exclusive prefix sum over the chunk counts (on the
// device) gives each chunk its output start; launch 2 rescans the chunk tile by tile and writes in
// order with a warp-ballot block scan, so the output is in global index order, exactly like the CPU
// kernel and the reference.
#include <torch/library.h>

#include "cuda_walk.cuh"
#include "unlearn/fragile.h"
#include "unlearn/fragile_checks.h"

namespace unlearn {
namespace cuda {
namespace {

__device__ __forceinline__ bool fragile_at(const ListView& view, int t, int64_t i, int64_t end, float thr) {
  return i < end && is_fragile(static_cast<const float*>(view.ptr(1, t))[i], thr);
}

__global__ void __launch_bounds__(kThreads) count_fragile_kernel(ListView view, float thr, int64_t* counts) {
  const int64_t c = blockIdx.x;
  const Unit u = block_unit(view);
  const int t = u.t;
  const int64_t end = u.end;
  unsigned long long local = 0;
  for (int64_t i = u.begin + threadIdx.x; i < end; i += kThreads) local += fragile_at(view, t, i, end, thr);
  for (int delta = 16; delta > 0; delta >>= 1) local += __shfl_down_sync(0xffffffffu, local, delta);
  __shared__ unsigned long long warp_sum[kWarps];
  if (threadIdx.x % 32 == 0) warp_sum[threadIdx.x / 32] = local;
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned long long s = 0;
    for (int w = 0; w < kWarps; ++w) s += warp_sum[w];
    counts[c] = static_cast<int64_t>(s);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) write_fragile_kernel(ListView view, float thr, const int64_t* inclusive,
                                                                 int64_t* out_index, float* out_value,
                                                                 float* out_radius) {
  const int64_t c = blockIdx.x;
  const Unit u = block_unit(view);
  const int t = u.t;
  const int64_t start = u.begin, end = u.end;
  const T* values = static_cast<const T*>(view.ptr(0, t));
  const float* radii = static_cast<const float*>(view.ptr(1, t));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __shared__ int warp_total[kWarps];
  int64_t base = c == 0 ? 0 : inclusive[c - 1];
  for (int64_t tile = start; tile < end; tile += kThreads) {
    const int64_t i = tile + threadIdx.x;
    const bool flag = fragile_at(view, t, i, end, thr);
    const unsigned ballot = __ballot_sync(0xffffffffu, flag);
    if (lane == 0) warp_total[warp] = __popc(ballot);
    __syncthreads();
    int before = __popc(ballot & ((1u << lane) - 1u)), tile_total = 0;
    for (int w = 0; w < kWarps; ++w) {
      before += w < warp ? warp_total[w] : 0;
      tile_total += warp_total[w];
    }
    if (flag) {
      const int64_t pos = base + before;
      out_index[pos] = view.offset(t) + i;
      out_value[pos] = to_float(values[i]);
      out_radius[pos] = radii[i];
    }
    base += tile_total;
    __syncthreads();  // warp_total is rewritten by the next tile
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fragile_compact_cuda(at::TensorList values_in, at::TensorList radii_in,
                                                                    double threshold) {
  const std::pair<FlatList, FlatList> inputs = fragile_inputs(values_in, radii_in);
  const FlatList& values = inputs.first;  // named references, not a structured binding: lambdas capture them
  const FlatList& radii = inputs.second;
  TORCH_CHECK(!values.tensors.empty(), "unlearn_ext: fragile_compact on CUDA needs at least one tensor");
  ListLaunch launch(values.tensors[0].device());
  const auto opts = at::TensorOptions().device(launch.device());
  const ListView view = launch.pack(numels_of(values.tensors), {values.tensors, radii.tensors}, kChunk);
  const float thr = float32_arg(threshold, "threshold", true);
  if (view.units == 0) {
    return {at::empty({0}, opts.dtype(at::kLong)), at::empty({0}, opts.dtype(at::kFloat)),
            at::empty({0}, opts.dtype(at::kFloat))};
  }
  at::Tensor counts = at::empty({view.units}, opts.dtype(at::kLong));
  launch.per_block(view, count_fragile_kernel, thr, counts.data_ptr<int64_t>());
  const at::Tensor inclusive = counts.cumsum(0);
  const int64_t total = inclusive[-1].item<int64_t>();  // the output size: one host sync, unavoidable
  at::Tensor index = at::empty({total}, opts.dtype(at::kLong));
  at::Tensor value = at::empty({total}, opts.dtype(at::kFloat));
  at::Tensor radius = at::empty({total}, opts.dtype(at::kFloat));
  if (total == 0) return {index, value, radius};
  dispatch_list(values.tensors, [&](auto tag) {
    using T = decltype(tag);
    launch.per_block(view, write_fragile_kernel<T>, thr, static_cast<const int64_t*>(inclusive.data_ptr<int64_t>()),
                     index.data_ptr<int64_t>(), value.data_ptr<float>(), radius.data_ptr<float>());
  });
  return {index, value, radius};
}

}  // namespace

TORCH_LIBRARY_IMPL(unlearn_ext, CUDA, m) { m.impl("fragile_compact", &fragile_compact_cuda); }

}  // namespace cuda
}  // namespace unlearn
