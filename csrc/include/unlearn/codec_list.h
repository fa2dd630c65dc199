// Host-side checks and addressing of the history codec ops (shared by CPU and CUDA).
//
// A codec list is a tensor list cut into blocks per tensor (see unlearn/codecs.h). Tensor t holds
// nblocks(t) = ceil(numel / block_size) blocks; the blocks of all tensors are numbered one after
// the other (unit_offsets in unlearn/tensor_list.h, with unit = block_size), which is how both
// backends spread work: CPU tasks and CUDA warps take global block numbers and map them back to
// (tensor, block).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "unlearn/codecs.h"
#include "unlearn/tensor_list.h"

namespace unlearn {

inline void check_codec_args(int64_t bits, int64_t block_size) {
  TORCH_CHECK(bits == 8 || bits == 4, "unlearn_ext: bits must be 8 (int8 codes) or 4 (int4 codes), got ",
              bits);
  // Even, so int4 byte pairs never straddle two blocks (each block owns whole bytes).
  TORCH_CHECK(block_size >= kMinBlock && block_size <= kMaxBlock && block_size % 2 == 0,
              "unlearn_ext: block_size must be an even number in [", kMinBlock, ", ", kMaxBlock, "], got ",
              block_size);
}

// The Format (unlearn/codecs.h) of (bits, levels): levels "linear" (int8 / int4 codes), "normal"
// (4-bit normal-quantile codebook) or "companded" (8-bit quadratic companding).
inline int check_codec_args(int64_t bits, int64_t block_size, c10::string_view levels) {
  check_codec_args(bits, block_size);
  if (levels == "linear") return bits == 8 ? kInt8 : kInt4;
  if (levels == "normal") {
    TORCH_CHECK(bits == 4, "unlearn_ext: levels 'normal' is a 4-bit codebook, got bits ", bits);
    return kNormal4;
  }
  if (levels == "companded") {
    TORCH_CHECK(bits == 8, "unlearn_ext: levels 'companded' is an 8-bit codebook, got bits ", bits);
    return kCompand8;
  }
  TORCH_CHECK(false, "unlearn_ext: levels must be 'linear', 'normal' (4-bit) or 'companded' (8-bit), got '",
              std::string(levels.data(), levels.size()), "'");
  return kInt8;
}

// Sizes: code_numel and block_count (unlearn/codecs.h).
inline at::ScalarType code_dtype(int64_t bits) { return bits == 8 ? at::kChar : at::kByte; }

// Codes and scales describing tensors of the given element counts: counts, dtypes, sizes and
// devices are checked; contiguous versions are returned (copies where the caller's were not).
struct CodedList {
  std::vector<at::Tensor> codes, scales;
};

inline CodedList check_coded_list(at::TensorList codes, at::TensorList scales, const FlatList& like,
                                  const char* like_name, int64_t bits, int64_t block_size) {
  const size_t n = like.tensors.size();
  TORCH_CHECK(codes.size() == n, "unlearn_ext: codes has ", codes.size(), " tensors but ", like_name, " has ",
              n);
  TORCH_CHECK(scales.size() == n, "unlearn_ext: scales has ", scales.size(), " tensors but ", like_name,
              " has ", n);
  CodedList out;
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = like.tensors[i].numel();
    TORCH_CHECK(codes[i].scalar_type() == code_dtype(bits), "unlearn_ext: codes[", i, "] has dtype ",
                codes[i].scalar_type(), "; ", bits, "-bit codes are ", code_dtype(bits));
    TORCH_CHECK(codes[i].numel() == code_numel(numel, bits), "unlearn_ext: codes[", i, "] has ",
                codes[i].numel(), " entries but ", like_name, "[", i, "] (", numel, " elements) needs ",
                code_numel(numel, bits), " for ", bits, "-bit codes");
    TORCH_CHECK(scales[i].scalar_type() == at::kFloat, "unlearn_ext: scales[", i, "] must be float32, got ",
                scales[i].scalar_type());
    TORCH_CHECK(scales[i].numel() == block_count(numel, block_size), "unlearn_ext: scales[", i, "] has ",
                scales[i].numel(), " entries but ", like_name, "[", i, "] (", numel, " elements) has ",
                block_count(numel, block_size), " blocks of ", block_size,
                " (codes and scales must come from the same block_size)");
    TORCH_CHECK(codes[i].device() == like.tensors[i].device() && scales[i].device() == like.tensors[i].device(),
                "unlearn_ext: codes[", i, "] and scales[", i, "] must be on ", like.tensors[i].device(),
                " like ", like_name, "[", i, "]");
    out.codes.push_back(codes[i].contiguous());
    out.scales.push_back(scales[i].contiguous());
  }
  return out;
}

// Fresh (codes, scales) outputs for a list, contiguous, flat (1-D).
inline CodedList empty_coded_list(const FlatList& x, int64_t bits, int64_t block_size) {
  CodedList out;
  for (const auto& t : x.tensors) {
    out.codes.push_back(at::empty({code_numel(t.numel(), bits)}, t.options().dtype(code_dtype(bits))));
    out.scales.push_back(at::empty({block_count(t.numel(), block_size)}, t.options().dtype(at::kFloat)));
  }
  return out;
}

// The checks every codec op that reads codes starts with: codec arguments, the value list (x, out,
// y, v: fp32/fp16/bf16, one dtype, one device) and codes/scales sized for it.
struct CodecInputs {
  FlatList values;
  CodedList coded;
  int format;
};

inline CodecInputs codec_inputs(at::TensorList values, const char* name, at::TensorList codes,
                                at::TensorList scales, int64_t bits, int64_t block_size, c10::string_view levels) {
  const int format = check_codec_args(bits, block_size, levels);
  FlatList v = flatten_float_list(values, name);
  CodedList q = check_coded_list(codes, scales, v, name, bits, block_size);
  return {std::move(v), std::move(q), format};
}

// alpha as the kernels use it (float): finite as a float, not just as a double.
inline float checked_alpha(double alpha) {
  return float32_arg(alpha, "alpha");
}

inline void check_recon_list(at::TensorList recon, const FlatList& target) {
  check_paired_lists(target.tensors, "target", recon, "recon");
  for (size_t i = 0; i < recon.size(); ++i)
    TORCH_CHECK(recon[i].scalar_type() == at::kFloat, "unlearn_ext: recon[", i,
                "] must be float32 (the reconstruction is kept exactly in fp32), got ", recon[i].scalar_type());
}

}  // namespace unlearn
