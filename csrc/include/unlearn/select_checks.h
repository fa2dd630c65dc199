// Argument checks of the selection ops (host side, shared by the CPU and CUDA bodies; the fakes in
// unlearn_ext/ops/fakes.py give the same messages).
#pragma once

#include <ATen/ATen.h>

#include "unlearn/select.h"
#include "unlearn/tensor_list.h"

namespace unlearn {

inline void check_key_mode(int64_t mode) {
  TORCH_CHECK(mode == kKeyValue || mode == kKeyAbs || mode == kKeyRandom,
              "unlearn_ext: key mode must be 0 (value), 1 (abs) or 2 (random), got ", mode);
}

inline void check_base(int64_t base) {
  TORCH_CHECK(base >= 0, "unlearn_ext: base (the global index of the list's first element) must be >= 0, got ",
              base);
}

inline void check_selection(int64_t threshold, int64_t boundary) {
  TORCH_CHECK(threshold >= -1 && threshold <= (int64_t(1) << 32),
              "unlearn_ext: threshold must be in [-1, 2^32], got ", threshold);
  TORCH_CHECK(boundary >= 0, "unlearn_ext: boundary must be >= 0, got ", boundary);
}

inline void check_histogram_args(int64_t prefix, int64_t prefix_bits, int64_t digit_bits) {
  TORCH_CHECK(digit_bits >= 1 && digit_bits <= 16, "unlearn_ext: digit_bits must be in [1, 16], got ", digit_bits);
  TORCH_CHECK(prefix_bits >= 0 && prefix_bits + digit_bits <= 32,
              "unlearn_ext: prefix_bits must be >= 0 with prefix_bits + digit_bits <= 32, got ", prefix_bits,
              " and ", digit_bits);
  TORCH_CHECK(prefix >= 0 && prefix < (int64_t(1) << prefix_bits),
              "unlearn_ext: prefix must be in [0, 2^prefix_bits), got ", prefix);
}

// select_apply_bin_'s boundary bin: keys whose top prefix_bits bits equal prefix.
inline void check_bin_args(int64_t prefix, int64_t prefix_bits, int64_t needed) {
  TORCH_CHECK(prefix_bits >= 1 && prefix_bits <= 32, "unlearn_ext: prefix_bits must be in [1, 32], got ", prefix_bits);
  TORCH_CHECK(prefix >= 0 && prefix < (int64_t(1) << prefix_bits),
              "unlearn_ext: prefix must be in [0, 2^prefix_bits), got ", prefix);
  TORCH_CHECK(needed >= 0, "unlearn_ext: needed must be >= 0, got ", needed);
}

inline void check_action(int64_t action, double alpha, size_t sources, size_t params) {
  TORCH_CHECK(action >= kActSet && action <= kActAxpy,
              "unlearn_ext: action must be 0 (set), 1 (scale), 2 (noise) or 3 (axpy), got ", action);
  TORCH_CHECK(std::isfinite(alpha), "unlearn_ext: alpha must be finite, got ", alpha);
  TORCH_CHECK(action != kActAxpy || sources == params, "unlearn_ext: action axpy needs a source tensor per param");
  TORCH_CHECK(sources == 0 || sources == params, "unlearn_ext: source has ", sources, " tensors but params has ",
              params, " (give one per param, or none)");
}

// select_apply_'s lists: params (float, in place), scores (float, shaped like params), source
// (none, or shaped like params with their dtype), masks (none, or bool shaped like params,
// contiguous: written in place). Returns the flattened scores.
inline FlatList check_apply_lists(at::TensorList params, at::TensorList scores, at::TensorList source,
                                  at::TensorList masks) {
  flatten_float_list(params, "params");
  FlatList s = flatten_float_list(scores, "scores");
  check_paired_lists(params, "params", scores, "scores");
  if (!source.empty()) {
    check_paired_lists(params, "params", source, "source");
    for (size_t i = 0; i < source.size(); ++i)
      TORCH_CHECK(source[i].scalar_type() == params[i].scalar_type(), "unlearn_ext: source[", i, "] has dtype ",
                  source[i].scalar_type(), " but params[", i, "] has ", params[i].scalar_type());
  }
  if (!masks.empty()) {
    check_paired_lists(params, "params", masks, "masks");
    for (size_t i = 0; i < masks.size(); ++i) {
      TORCH_CHECK(masks[i].scalar_type() == at::kBool, "unlearn_ext: masks[", i, "] must be bool, got ",
                  masks[i].scalar_type());
      TORCH_CHECK(masks[i].is_contiguous(), "unlearn_ext: masks[", i, "] must be contiguous");
    }
  }
  return s;
}

}  // namespace unlearn
