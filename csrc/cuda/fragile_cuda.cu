// CUDA kernel of fragile_compact (see csrc/cpu/fragile_cpu.cpp for the contract). Thread block c
// owns chunk c of the list walk. Launch 1 counts each chunk's fragile entries; an exclusive prefix
// sum over the chunk counts (on the device) gives each chunk its output start; launch 2 rescans the
// chunk tile by tile and writes in order with a warp-ballot block scan, so the output is in global
// index order, exactly like the CPU kernel and the reference.
#include <torch/library.h>

#include "cuda_walk.cuh"

namespace unlearn {
namespace cuda {
namespace {

constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ bool fragile_at(const ListView& view, int t, int64_t i, int64_t end, float thr) {
  return i < end && is_fragile(static_cast<const float*>(view.ptr(1, t))[i], thr);
}

__global__ void __launch_bounds__(kThreads) count_fragile_kernel(ListView view, float thr, int64_t* counts) {
  const int64_t c = blockIdx.x;
  const int t = view.chunk_tensor(c);
  const int64_t start = view.chunk_start(c), end = min(start + kChunk, view.numel(t));
  unsigned long long local = 0;
  for (int64_t i = start + threadIdx.x; i < end; i += kThreads) local += fragile_at(view, t, i, end, thr);
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
  const int t = view.chunk_tensor(c);
  const int64_t start = view.chunk_start(c), end = min(start + kChunk, view.numel(t));
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
  const at::Device device = values.tensors[0].device();
  c10::cuda::CUDAGuard guard(device);
  const auto opts = at::TensorOptions().device(device);
  at::Tensor keep;
  const ListView view = pack_lists({values.tensors, radii.tensors}, device, keep);
  const float thr = static_cast<float>(threshold);
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (view.chunks == 0) {
    return {at::empty({0}, opts.dtype(at::kLong)), at::empty({0}, opts.dtype(at::kFloat)),
            at::empty({0}, opts.dtype(at::kFloat))};
  }
  at::Tensor counts = at::empty({view.chunks}, opts.dtype(at::kLong));
  count_fragile_kernel<<<static_cast<unsigned>(view.chunks), kThreads, 0, stream>>>(view, thr,
                                                                                    counts.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor inclusive = counts.cumsum(0);
  const int64_t total = inclusive[-1].item<int64_t>();  // the output size: one host sync, unavoidable
  at::Tensor index = at::empty({total}, opts.dtype(at::kLong));
  at::Tensor value = at::empty({total}, opts.dtype(at::kFloat));
  at::Tensor radius = at::empty({total}, opts.dtype(at::kFloat));
  if (total == 0) return {index, value, radius};
  dispatch_float_type(values.tensors[0].scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    write_fragile_kernel<T><<<static_cast<unsigned>(view.chunks), kThreads, 0, stream>>>(
        view, thr, inclusive.data_ptr<int64_t>(), index.data_ptr<int64_t>(), value.data_ptr<float>(),
        radius.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {index, value, radius};
}

}  // namespace

TORCH_LIBRARY_IMPL(unlearn_ext, CUDA, m) { m.impl("fragile_compact", &fragile_compact_cuda); }

}  // namespace cuda
}  // namespace unlearn
