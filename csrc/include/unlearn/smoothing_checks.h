// Argument checks of the smoothing family (quantize, fused steps, apply_codes, votes), host side,
// shared by CPU and CUDA; the generic list checks are in tensor_list.h.
#pragma once

#include <cmath>
#include <limits>

#include "unlearn/tensor_list.h"

namespace unlearn {

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

}  // namespace unlearn
