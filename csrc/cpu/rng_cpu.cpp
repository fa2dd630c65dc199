// CPU kernels exposing the RNG contract (DESIGN section 3) directly: the 32-bit words, the uniforms
// and Bernoulli draws of any global element indices. Tests compare them with the reference; later
// ops (Random-k selection) use the same header functions.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "unlearn/philox.h"
#include "unlearn/rng_checks.h"
#include "unlearn/tensor_list.h"

namespace unlearn {
namespace cpu {
namespace {

// Calls f(row, draw, word) for every (element, draw) pair, in parallel over elements.
template <typename F>
void for_each_word(const at::Tensor& index, int64_t draws, int64_t seed, int64_t offset, F&& f) {
  const at::Tensor idx = index.contiguous();
  const int64_t* e = idx.data_ptr<int64_t>();
  at::parallel_for(0, idx.numel(), 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t b = 0; 4 * b < draws; ++b) {
        const PhiloxBlock r = philox_block_for(as_u64(seed), as_u64(offset), b, as_u64(e[i]));
        for (int q = 0; q < 4 && 4 * b + q < draws; ++q) f(i, 4 * b + q, r.w[q]);
      }
    }
  });
}

std::vector<int64_t> output_shape(const at::Tensor& index, int64_t draws) {
  std::vector<int64_t> shape(index.sizes().begin(), index.sizes().end());
  shape.push_back(draws);
  return shape;
}

at::Tensor philox_bits_cpu(const at::Tensor& index, int64_t draws, int64_t seed, int64_t offset) {
  check_rng_arguments(index, draws);
  at::Tensor out = at::empty(output_shape(index, draws), index.options().dtype(at::kInt));
  int32_t* o = out.data_ptr<int32_t>();
  for_each_word(index, draws, seed, offset,
                [&](int64_t i, int64_t j, uint32_t w) { o[i * draws + j] = static_cast<int32_t>(w); });
  return out;
}

at::Tensor philox_uniform_cpu(const at::Tensor& index, int64_t draws, int64_t seed, int64_t offset) {
  check_rng_arguments(index, draws);
  at::Tensor out = at::empty(output_shape(index, draws), index.options().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  for_each_word(index, draws, seed, offset,
                [&](int64_t i, int64_t j, uint32_t w) { o[i * draws + j] = uniform_from_word(w); });
  return out;
}

at::Tensor philox_bernoulli_cpu(const at::Tensor& index, int64_t draws, double p, int64_t seed,
                                int64_t offset) {
  check_rng_arguments(index, draws);
  check_probability(p);
  const uint32_t threshold = levels_below(p);
  at::Tensor out = at::empty(output_shape(index, draws), index.options().dtype(at::kBool));
  bool* o = out.data_ptr<bool>();
  for_each_word(index, draws, seed, offset, [&](int64_t i, int64_t j, uint32_t w) {
    o[i * draws + j] = uniform_level(w) < threshold;
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(unlearn_ext, CPU, m) {
  m.impl("philox_bits", &philox_bits_cpu);
  m.impl("philox_uniform", &philox_uniform_cpu);
  m.impl("philox_bernoulli", &philox_bernoulli_cpu);
}

}  // namespace cpu
}  // namespace unlearn
