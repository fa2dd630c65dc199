// Multi-tensor addressing (host side, shared by the CPU and CUDA implementations).
//
// Ops take Tensor[] and treat the list as one long vector: the global element index of element j
// of tensor t is offsets[t] + j, where offsets are the running sums of numel. The global index is
// what the RNG uses as its subsequence, so it depends only on the list's shapes, never on strides
// or on how work is split.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

namespace unlearn {

struct FlatList {
  std::vector<at::Tensor> tensors;  // contiguous (copies are made for non-contiguous inputs)
  std::vector<int64_t> offsets;     // size tensors.size() + 1; offsets.back() = total numel
  int64_t total() const { return offsets.back(); }
};

inline bool is_kernel_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// Checks a list of floating inputs: one dtype (fp32/fp16/bf16) and one device for all of them.
// An empty list is valid and yields an empty FlatList.
inline FlatList flatten_float_list(at::TensorList list, const char* name) {
  FlatList flat;
  flat.offsets.reserve(list.size() + 1);
  flat.offsets.push_back(0);
  for (size_t i = 0; i < list.size(); ++i) {
    const at::Tensor& t = list[i];
    TORCH_CHECK(t.defined(), "unlearn_ext: ", name, "[", i, "] is undefined");
    TORCH_CHECK(is_kernel_float_dtype(t.scalar_type()), "unlearn_ext: ", name, "[", i,
                "] has dtype ", t.scalar_type(), "; expected float32, float16 or bfloat16");
    TORCH_CHECK(t.scalar_type() == list[0].scalar_type(), "unlearn_ext: all tensors in ", name,
                " must share one dtype, but ", name, "[0] is ", list[0].scalar_type(), " and ",
                name, "[", i, "] is ", t.scalar_type());
    TORCH_CHECK(t.device() == list[0].device(), "unlearn_ext: all tensors in ", name,
                " must be on one device, but ", name, "[0] is on ", list[0].device(), " and ",
                name, "[", i, "] is on ", t.device());
    flat.tensors.push_back(t.contiguous());
    flat.offsets.push_back(flat.offsets.back() + t.numel());
  }
  return flat;
}

inline void check_paired_lists(at::TensorList a, const char* a_name, at::TensorList b,
                               const char* b_name) {
  TORCH_CHECK(a.size() == b.size(), "unlearn_ext: ", a_name, " has ", a.size(), " tensors but ",
              b_name, " has ", b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    TORCH_CHECK(a[i].sizes() == b[i].sizes(), "unlearn_ext: ", a_name, "[", i, "] has shape ",
                a[i].sizes(), " but ", b_name, "[", i, "] has shape ", b[i].sizes());
    TORCH_CHECK(a[i].device() == b[i].device(), "unlearn_ext: ", a_name, "[", i, "] is on ",
                a[i].device(), " but ", b_name, "[", i, "] is on ", b[i].device());
  }
}

// An in-place list (params, y, out, recon) as contiguous work tensors (the originals where they
// already are contiguous); `write_back` copies results into the non-contiguous originals.
inline std::vector<at::Tensor> contiguous_work(at::TensorList list) {
  std::vector<at::Tensor> work(list.begin(), list.end());
  for (auto& w : work)
    if (!w.is_contiguous()) w = w.contiguous();
  return work;
}

inline void write_back(at::TensorList originals, const std::vector<at::Tensor>& work) {
  for (size_t i = 0; i < originals.size(); ++i)
    if (!work[i].is_same(originals[i])) originals[i].copy_(work[i]);
}

// The kernels compute in float32: a float argument must keep its meaning when rounded to float32.
// A finite double beyond FLT_MAX (1e39) rounds to inf and would write inf/NaN into parameters, so
// it is refused like NaN; with allow_inf, +-inf itself is accepted (count_below = inf counts all).
inline float float32_arg(double x, const char* name, bool allow_inf = false) {
  const float f = static_cast<float>(x);
  TORCH_CHECK(!std::isnan(x) && (std::isfinite(f) || (allow_inf && std::isinf(x))), "unlearn_ext: ", name,
              allow_inf ? " must be a float32 number or +-inf" : " must be finite as float32 (|x| <= 3.4028235e38)",
              ", got ", x);
  return f;
}

// Calls f(tensor_index, local_begin, local_end, global_begin) for each piece of the global range
// [begin, end) that lies inside one tensor.
template <typename F>
inline void for_each_span(const std::vector<int64_t>& offsets, int64_t begin, int64_t end, F&& f) {
  if (begin >= end) return;
  // Largest t with offsets[t] <= begin (skipping empty tensors).
  size_t t = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
  for (; t + 1 < offsets.size() && offsets[t] < end; ++t) {
    const int64_t lo = std::max(begin, offsets[t]);
    const int64_t hi = std::min(end, offsets[t + 1]);
    if (lo < hi) f(t, lo - offsets[t], hi - offsets[t], lo);
  }
}

inline std::vector<int64_t> numels_of(const std::vector<at::Tensor>& list) {
  std::vector<int64_t> n;
  n.reserve(list.size());
  for (const auto& t : list) n.push_back(t.numel());
  return n;
}

// Walks that cut every tensor into units of `unit` elements (a tensor's last unit may be short, and
// units never span two tensors; e.g. codec blocks, or CUDA chunks) number the units across the list,
// tensor after tensor: tensor t owns the units [offsets[t], offsets[t + 1]) of unit_offsets.
inline int64_t unit_count(int64_t numel, int64_t unit) { return (numel + unit - 1) / unit; }

inline std::vector<int64_t> unit_offsets(const std::vector<int64_t>& numels, int64_t unit) {
  std::vector<int64_t> off{0};
  off.reserve(numels.size() + 1);
  for (int64_t n : numels) off.push_back(off.back() + unit_count(n, unit));
  return off;
}

// Outputs shaped like each input, contiguous, of the given dtype.
inline std::vector<at::Tensor> empty_like_list(const FlatList& flat, at::ScalarType dtype) {
  std::vector<at::Tensor> out;
  out.reserve(flat.tensors.size());
  for (const auto& t : flat.tensors) out.push_back(at::empty(t.sizes(), t.options().dtype(dtype)));
  return out;
}

// Calls f(tag) with a value of the kernel element type for fp32 / fp16 / bf16.
template <typename F>
inline void dispatch_float_type(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(c10::Half{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "unlearn_ext: unsupported dtype ", t);
  }
}

// Reinterprets a signed schema int (int64) as the unsigned 64-bit seed/offset of the RNG contract.
inline uint64_t as_u64(int64_t v) { return static_cast<uint64_t>(v); }

}  // namespace unlearn
