// The one registry: every operator schema of unlearn_ext is declared here, once. CPU and CUDA files
// only register implementations (TORCH_LIBRARY_IMPL); Python registers fake implementations
// (unlearn_ext/_ops.py) so the ops trace under torch.compile.
//
// Conventions: lists of tensors are one long vector (global element index = offset of the tensor
// in the list + index inside it); `seed` and `offset` are the RNG contract's key and block offset,
// read as unsigned 64-bit; statistics come back as (min_radius: float32 scalar,
// counts: int64[3] = [abstained, nonfinite, radius_below_count_below]).
#include <torch/library.h>

TORCH_LIBRARY(unlearn_ext, m) {
  // RNG contract (DESIGN section 3): draws `draws` words per element index.
  m.def("philox_bits(Tensor element_index, int draws, int seed, int offset) -> Tensor");
  m.def("philox_uniform(Tensor element_index, int draws, int seed, int offset) -> Tensor");
  m.def("philox_bernoulli(Tensor element_index, int draws, float p, int seed, int offset) -> Tensor");

  // Smoothed ternary quantization (DESIGN section 4, framework G).
  m.def(
      "quantize_analytic(Tensor[] grads, float beta, float count_below) -> "
      "(Tensor[] codes, Tensor[] radii, Tensor min_radius, Tensor counts)");
  m.def(
      "quantize_mc(Tensor[] grads, float tau, float sigma, int n0, int n, Tensor radius_table, "
      "int seed, int offset, float count_below) -> "
      "(Tensor[] codes, Tensor[] radii, Tensor min_radius, Tensor counts)");
  // Fused step: params <- params - step_size * code, statistics reduced in the same pass. With
  // check_finite, a gradient holding NaN/Inf leaves every parameter untouched and counts[1] > 0.
  m.def(
      "quantized_step_analytic_(Tensor(a!)[] params, Tensor[] grads, float beta, float step_size, "
      "float count_below, bool check_finite) -> (Tensor min_radius, Tensor counts)");
  m.def(
      "quantized_step_mc_(Tensor(a!)[] params, Tensor[] grads, float tau, float sigma, int n0, int n, "
      "Tensor radius_table, int seed, int offset, float step_size, float count_below, "
      "bool check_finite) -> (Tensor min_radius, Tensor counts)");

  // Data smoothing (framework D): per-coordinate vote counters of shape (2, *grad.shape).
  m.def("vote_accumulate_(Tensor(a!)[] votes, Tensor[] grads, float tau) -> Tensor nonfinite");
  m.def(
      "vote_finalize(Tensor[] selection_votes, Tensor[] estimation_votes, int n0, int n, "
      "Tensor radius_table, float sigma, float count_below) -> "
      "(Tensor[] codes, Tensor[] radii, Tensor min_radius, Tensor counts)");

  // Per-request certificates (DESIGN section 4): the fragile coordinates of one step, compacted in
  // global-index order: every element whose radius < threshold (a NaN radius counts as fragile),
  // with its value (as float32) and its radius. One pass to count per chunk, one to write.
  m.def(
      "fragile_compact(Tensor[] values, Tensor[] radii, float threshold) -> "
      "(Tensor index, Tensor value, Tensor radius)");
}
