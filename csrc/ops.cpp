// The one registry: every operator schema of unlearn_ext is declared here, once. CPU and CUDA files
// only register implementations (TORCH_LIBRARY_IMPL); Python registers fake implementations
// (unlearn_ext/ops/fakes.py) so the ops trace under torch.compile.
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

  // params <- params - step_size * code from stored int8 codes in {-1, 0, 1} shaped like params:
  // the update of the fused steps above (fp32 math, one rounding), for replays.
  m.def("apply_codes_(Tensor(a!)[] params, Tensor[] codes, float step_size) -> ()");

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
  // ---- Compressed history codecs (DESIGN section 5) ----------------------------------------------
  // Blockwise absmax quantization, blocks per tensor (a tensor's last block may be short), block
  // size even in [64, 4096]; math in unlearn/codecs.h. Per input tensor: codes are flat, int8
  // (bits = 8, numel entries) or uint8 with two int4 codes per byte (bits = 4, ceil(numel / 2)
  // entries, low nibble first); scales are flat float32, one per block (scale = absmax / 127 or / 7).
  m.def("blockwise_quantize(Tensor[] x, int bits, int block_size) -> (Tensor[] codes, Tensor[] scales)");
  // out <- deq(codes, scales); out gives the shapes and the dtype (fp32/fp16/bf16).
  m.def(
      "blockwise_dequantize_(Tensor(a!)[] out, Tensor[] codes, Tensor[] scales, int bits, int block_size) -> ()");
  // Closed-loop delta: codes, scales <- quantize(target - recon); recon (float32) += deq(codes, scales).
  // codes and scales are preallocated outputs (sized as blockwise_quantize returns them): a
  // mutable op returning fresh tensor lists cannot be functionalized (torch.compile, opcheck).
  m.def(
      "delta_encode_(Tensor[] target, Tensor(a!)[] recon, Tensor(b!)[] codes, Tensor(c!)[] scales, int bits, "
      "int block_size) -> ()");
  // y <- y + alpha * deq(codes, scales) (fp32 math, rounded like recon updates: bit-exact decode).
  m.def(
      "dequantize_axpy_(Tensor(a!)[] y, float alpha, Tensor[] codes, Tensor[] scales, int bits, "
      "int block_size) -> ()");
  // <deq(codes, scales), v> over the whole list, as a float64 scalar.
  m.def("dequantize_dot(Tensor[] codes, Tensor[] scales, Tensor[] v, int bits, int block_size) -> Tensor");

  // ---- Selection: Top-K / Random-k (DESIGN section 7, our formulation; math in unlearn/select.h) ----
  // key_mode: 0 the score as given, 1 |score|, 2 random (Philox word of the global index at (seed,
  // offset); scores then only give shapes). `base` is the global index of the list's first element
  // (0 for a whole list; a shard's start in distributed selection). An element is selected iff
  // key > threshold or (key == threshold and global index < boundary).
  // Histogram of one radix digit: keys whose top prefix_bits bits equal prefix, counted by their
  // next digit_bits bits; int64[2^digit_bits + 1], the last entry counts NaN scores (any prefix).
  // Shards' histograms add up to the whole list's (the distributed selection's all-reduce).
  m.def(
      "select_histogram(Tensor[] scores, int key_mode, int seed, int offset, int base, int prefix, "
      "int prefix_bits, int digit_bits) -> Tensor");
  // The tie boundary: the global index b such that exactly `needed` elements with key == `key` lie
  // below b (base if needed = 0; base + numel if fewer ties exist). int64 scalar.
  m.def(
      "select_tie_boundary(Tensor[] scores, int key_mode, int seed, int offset, int base, int key, "
      "int needed) -> Tensor");
  // Fused apply: perturbs the selected coordinates of params in place (action 0 set to source / 0,
  // 1 scale by alpha, 2 add alpha * N(0,1) from (noise_seed, noise_offset), 3 add alpha * source),
  // writes masks when given (bool, shaped like params), returns how many were selected (int64).
  // In random mode scores may be empty (params give the shapes).
  m.def(
      "select_apply_(Tensor(a!)[] params, Tensor[] scores, Tensor[] source, Tensor(b!)[] masks, int key_mode, "
      "int seed, int offset, int base, int threshold, int boundary, int action, float alpha, int noise_seed, "
      "int noise_offset) -> Tensor");
  // Masked gradient (masked repair, normalized ascent): zeroes the unselected coordinates of grads in
  // place; returns the float64 sum of squares of the kept ones.
  m.def(
      "select_mask_grad_(Tensor(a!)[] grads, Tensor[] scores, int key_mode, int seed, int offset, int base, "
      "int threshold, int boundary) -> Tensor");
}
