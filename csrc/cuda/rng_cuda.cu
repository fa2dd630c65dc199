// CUDA kernels exposing the RNG contract directly (words, uniforms, Bernoulli draws), one thread
// per element index; the arithmetic is unlearn/philox.h, shared with the CPU kernels. The index is
// one tensor, not a list, so only cuda_walk.cuh's launch_kernel (current stream) is used.
#include <torch/library.h>

#include "cuda_walk.cuh"
#include "unlearn/philox.h"
#include "unlearn/rng_checks.h"
#include "unlearn/tensor_list.h"

namespace unlearn {
namespace cuda {
namespace {

enum class Output { kBits, kUniform, kBernoulli };

template <Output kind, typename OutT>
__global__ void philox_kernel(const int64_t* index, int64_t count, int64_t draws, uint64_t seed, uint64_t offset,
                              uint32_t threshold, OutT* out) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= count) return;
  for (int64_t b = 0; 4 * b < draws; ++b) {
    const PhiloxBlock r = philox_block_for(seed, offset, static_cast<uint64_t>(b), static_cast<uint64_t>(index[i]));
    for (int q = 0; q < 4 && 4 * b + q < draws; ++q) {
      const uint32_t w = r.w[q];
      OutT& o = out[i * draws + 4 * b + q];
      if constexpr (kind == Output::kBits) o = static_cast<int32_t>(w);
      else if constexpr (kind == Output::kUniform) o = uniform_from_word(w);
      else o = uniform_level(w) < threshold;
    }
  }
}

template <Output kind, typename OutT>
at::Tensor run(const at::Tensor& index, int64_t draws, int64_t seed, int64_t offset, at::ScalarType dtype,
               uint32_t threshold = 0) {
  check_rng_arguments(index, draws);
  c10::cuda::CUDAGuard guard(index.device());
  const at::Tensor idx = index.contiguous();
  std::vector<int64_t> shape(index.sizes().begin(), index.sizes().end());
  shape.push_back(draws);
  at::Tensor out = at::empty(shape, index.options().dtype(dtype));
  const int64_t count = idx.numel();
  if (count == 0 || draws == 0) return out;
  launch_kernel((count + kThreads - 1) / kThreads, kThreads, philox_kernel<kind, OutT>,
                static_cast<const int64_t*>(idx.data_ptr<int64_t>()), count, draws, as_u64(seed), as_u64(offset),
                threshold, reinterpret_cast<OutT*>(out.data_ptr()));
  return out;
}

at::Tensor philox_bits_cuda(const at::Tensor& index, int64_t draws, int64_t seed, int64_t offset) {
  return run<Output::kBits, int32_t>(index, draws, seed, offset, at::kInt);
}

at::Tensor philox_uniform_cuda(const at::Tensor& index, int64_t draws, int64_t seed, int64_t offset) {
  return run<Output::kUniform, double>(index, draws, seed, offset, at::kDouble);
}

at::Tensor philox_bernoulli_cuda(const at::Tensor& index, int64_t draws, double p, int64_t seed, int64_t offset) {
  TORCH_CHECK(p >= 0.0 && p <= 1.0, "unlearn_ext: p must be in [0, 1], got ", p);
  return run<Output::kBernoulli, bool>(index, draws, seed, offset, at::kBool, levels_below(p));
}

}  // namespace

TORCH_LIBRARY_IMPL(unlearn_ext, CUDA, m) {
  m.impl("philox_bits", &philox_bits_cuda);
  m.impl("philox_uniform", &philox_uniform_cuda);
  m.impl("philox_bernoulli", &philox_bernoulli_cuda);
}

}  // namespace cuda
}  // namespace unlearn
