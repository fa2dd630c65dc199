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

inline float check_beta(double beta) {
  const float b = float32_arg(beta, "beta");
  TORCH_CHECK(beta >= 0, "unlearn_ext: beta must be finite and >= 0, got ", beta);
  return b;
}

// Validates the scalar arguments of the Monte-Carlo certification.
inline void check_mc_arguments(double sigma, int64_t n0, int64_t n, const at::Tensor& radius_table,
                               const at::Device& device) {
  // > 0 as float32 too: a sigma that underflows to 0 would divide by zero.
  TORCH_CHECK(float32_arg(sigma, "sigma") > 0, "unlearn_ext: sigma must be a finite number > 0, got ", sigma);
  TORCH_CHECK(n0 >= 1, "unlearn_ext: n0 (selection draws) must be >= 1, got ", n0);
  TORCH_CHECK(n >= 1, "unlearn_ext: n (estimation draws) must be >= 1, got ", n);
  TORCH_CHECK(n0 + n <= (int64_t(1) << 30), "unlearn_ext: n0 + n is too large (", n0 + n, ")");
  TORCH_CHECK(radius_table.dim() == 1 && radius_table.numel() == n + 1,
              "unlearn_ext: radius_table must be a 1-D tensor of n + 1 = ", n + 1,
              " entries (one per possible count), got shape ", radius_table.sizes());
  TORCH_CHECK(radius_table.scalar_type() == at::kFloat,
              "unlearn_ext: radius_table must be float32, got ", radius_table.scalar_type());
  TORCH_CHECK(radius_table.device() == device, "unlearn_ext: radius_table is on ",
              radius_table.device(), " but the gradients are on ", device);
}

inline void check_tau(double tau) {
  float32_arg(tau, "tau");
  TORCH_CHECK(tau >= 0, "unlearn_ext: tau must be a finite number >= 0, got ", tau);
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

// Outputs shaped like each input, contiguous, of the given dtype.
inline std::vector<at::Tensor> empty_like_list(const FlatList& flat, at::ScalarType dtype) {
  std::vector<at::Tensor> out;
  out.reserve(flat.tensors.size());
  for (const auto& t : flat.tensors) out.push_back(at::empty(t.sizes(), t.options().dtype(dtype)));
  return out;
}

// Checks the parameter list of a fused step against its gradients (count, shapes, devices, dtypes).
inline void check_step_lists(at::TensorList params, const FlatList& grads, double step_size) {
  float32_arg(step_size, "step_size");
  check_paired_lists(params, "params", grads.tensors, "grads");
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(params[i].scalar_type() == grads.tensors[i].scalar_type(), "unlearn_ext: params[", i,
                "] has dtype ", params[i].scalar_type(), " but grads[", i, "] has ",
                grads.tensors[i].scalar_type(), "; they must match");
  }
}

// apply_codes_'s lists: params (fp32/fp16/bf16, one dtype and device) and one int8 code tensor per
// parameter, shaped like it, on its device. Returns the codes, contiguous.
inline std::vector<at::Tensor> check_apply_codes(at::TensorList params, at::TensorList codes, double step_size) {
  float32_arg(step_size, "step_size");
  flatten_float_list(params, "params");  // dtype and device checks only; params are updated in place
  check_paired_lists(params, "params", codes, "codes");
  std::vector<at::Tensor> out;
  out.reserve(codes.size());
  for (size_t i = 0; i < codes.size(); ++i) {
    TORCH_CHECK(codes[i].scalar_type() == at::kChar, "unlearn_ext: codes[", i,
                "] must be int8 ternary codes, got ", codes[i].scalar_type());
    out.push_back(codes[i].contiguous());
  }
  return out;
}

// Vote counters of framework D: int16/int32, shape (2, *like[i].shape), contiguous, same device.
inline void check_vote_list(at::TensorList votes, const FlatList& like, const char* name) {
  TORCH_CHECK(votes.size() == like.tensors.size(), "unlearn_ext: ", name, " has ", votes.size(),
              " tensors but grads has ", like.tensors.size());
  for (size_t i = 0; i < votes.size(); ++i) {
    const at::Tensor& v = votes[i];
    TORCH_CHECK(v.scalar_type() == at::kShort || v.scalar_type() == at::kInt, "unlearn_ext: ", name,
                "[", i, "] must be int16 or int32 counts, got ", v.scalar_type());
    TORCH_CHECK(v.scalar_type() == votes[0].scalar_type(), "unlearn_ext: all tensors in ", name,
                " must share one dtype");
    std::vector<int64_t> expected{2};
    for (auto d : like.tensors[i].sizes()) expected.push_back(d);
    TORCH_CHECK(v.sizes() == at::IntArrayRef(expected), "unlearn_ext: ", name, "[", i,
                "] must have shape (2, *grads[", i, "].shape) = ", at::IntArrayRef(expected),
                " (counts of -1 and +1 votes), got ", v.sizes());
    TORCH_CHECK(v.is_contiguous(), "unlearn_ext: ", name, "[", i, "] must be contiguous");
    TORCH_CHECK(v.device() == like.tensors[i].device(), "unlearn_ext: ", name, "[", i, "] is on ",
                v.device(), " but grads[", i, "] is on ", like.tensors[i].device());
  }
}

// vote_accumulate_ adds at most one vote per coordinate: refused (before any counter changes) where
// a counter already holds its dtype's maximum, since it would wrap silently. Costs one read of the
// counters (and a device sync on CUDA); VoteCounter never gets here (it sizes counters for n0, n).
inline void check_vote_room(at::TensorList votes) {
  for (size_t i = 0; i < votes.size(); ++i) {
    if (votes[i].numel() == 0) continue;
    const int64_t limit = votes[i].scalar_type() == at::kShort ? INT16_MAX : INT32_MAX;
    const int64_t most = votes[i].max().item<int64_t>();
    TORCH_CHECK(most < limit, "unlearn_ext: votes[", i, "] holds a count of ", most, ", the most its dtype ",
                votes[i].scalar_type(), " can hold; one more vote would overflow (use int32 counters)");
  }
}

// The coordinate shapes behind vote_finalize's counters (their trailing dims), validated, as a
// stand-in gradient list for the shared checks and output allocation.
inline FlatList vote_finalize_shapes(at::TensorList selection, at::TensorList estimation) {
  TORCH_CHECK(selection.size() == estimation.size(), "unlearn_ext: selection_votes has ",
              selection.size(), " tensors but estimation_votes has ", estimation.size());
  TORCH_CHECK(!selection.empty(), "unlearn_ext: vote_finalize needs at least one tensor");
  FlatList shapes;
  shapes.offsets.push_back(0);
  for (size_t i = 0; i < selection.size(); ++i) {
    TORCH_CHECK(selection[i].dim() >= 1 && selection[i].size(0) == 2, "unlearn_ext: selection_votes[", i,
                "] must have shape (2, ...), got ", selection[i].sizes());
    shapes.tensors.push_back(at::empty(selection[i].sizes().slice(1), selection[i].options().dtype(at::kFloat)));
    shapes.offsets.push_back(shapes.offsets.back() + shapes.tensors.back().numel());
  }
  check_vote_list(selection, shapes, "selection_votes");
  check_vote_list(estimation, shapes, "estimation_votes");
  return shapes;
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
