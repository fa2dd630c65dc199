// Argument checks of the fragile family (fragile_compact), host side, shared by CPU and CUDA.
#pragma once

#include "unlearn/tensor_list.h"

namespace unlearn {

// fragile_compact's inputs (CPU and CUDA): values (fp32/fp16/bf16) and one float32 radius per
// value, paired by shape and device; both flattened.
inline std::pair<FlatList, FlatList> fragile_inputs(at::TensorList values, at::TensorList radii) {
  check_paired_lists(values, "values", radii, "radii");
  FlatList v = flatten_float_list(values, "values");
  for (size_t i = 0; i < radii.size(); ++i)
    TORCH_CHECK(radii[i].scalar_type() == at::kFloat, "unlearn_ext: radii[", i, "] must be float32, got ",
                radii[i].scalar_type());
  FlatList r = flatten_float_list(radii, "radii");
  return {std::move(v), std::move(r)};
}

}  // namespace unlearn
