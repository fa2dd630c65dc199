// Argument checks of the raw RNG ops (philox_bits / uniform / bernoulli), shared by the CPU and CUDA
// kernels; unlearn_ext/ops/op_checks.py gives the same messages for the reference and the fakes.
#pragma once

#include <ATen/ATen.h>

namespace unlearn {

// The most words one call draws per element index (unlearn_ext/ops/schemas.py, MAX_DRAWS): a
// bound on one call's output, not on the stream (further calls continue at a later offset).
constexpr int64_t kMaxDraws = int64_t(1) << 16;

inline void check_rng_arguments(const at::Tensor& element_index, int64_t draws) {
  TORCH_CHECK(element_index.scalar_type() == at::kLong, "unlearn_ext: element_index must be int64, got ",
              element_index.scalar_type());
  TORCH_CHECK(draws >= 0 && draws <= kMaxDraws, "unlearn_ext: draws must be in [0, ", kMaxDraws,
              "] (words per element index in one call; draw more with further calls at a later offset), got ",
              draws);
}

inline void check_probability(double p) {
  TORCH_CHECK(p >= 0.0 && p <= 1.0, "unlearn_ext: p must be in [0, 1], got ", p);
}

}  // namespace unlearn
