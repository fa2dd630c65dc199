// CUDA kernels of the smoothing + quantization family. Per-element math comes from
// unlearn/smoothing.h (shared with the CPU kernels); this file only maps elements to threads.
#include <torch/library.h>

#include "cuda_walk.cuh"
#include "smoothing_stats.cuh"
#include "unlearn/smoothing.h"
#include "unlearn/smoothing_checks.h"
#include "unlearn/tensor_list.h"

namespace unlearn {
namespace cuda {
namespace {

// Arrays of the gradient walks: gradients, then codes + radii (quantize) or params (step).
enum Slot { kIn = 0, kOutA = 1, kOutB = 2 };

// Output sinks: write (code, radius) to two arrays, or apply the quantized step to parameters.
template <typename T>
struct WriteCodes {
  __device__ __forceinline__ void operator()(const ListView& v, int t, int64_t i, Decision d) const {
    static_cast<int8_t*>(v.ptr(kOutA, t))[i] = d.code;
    static_cast<float*>(v.ptr(kOutB, t))[i] = d.radius;
  }
};

template <typename T>
struct ApplyStep {
  float step;
  __device__ __forceinline__ void operator()(const ListView& v, int t, int64_t i, Decision d) const {
    T* w = static_cast<T*>(v.ptr(kOutA, t));
    w[i] = static_cast<T>(quantized_update(to_float(w[i]), step, d.code));
  }
};

__device__ __forceinline__ void add_stats(BlockStats& s, float v, Decision d, int32_t abstained, float below) {
  s.nonfinite += !is_finite_float(v);
  s.abstained += abstained;
  s.below += d.radius < below;
  s.min_radius_bits = min(s.min_radius_bits, radius_bits(d.radius));
}

template <typename T, typename Sink>
struct AnalyticOp {
  float beta, below;
  Sink sink;
  __device__ __forceinline__ void operator()(const ListView& v, int t, int64_t i, int64_t, BlockStats& s) const {
    const float g = to_float(static_cast<const T*>(v.ptr(kIn, t))[i]);
    const Decision d = analytic_decision(g, beta);
    sink(v, t, i, d);
    add_stats(s, g, d, 0, below);
  }
};

template <typename T, typename Sink>
struct McOp {
  float tau, sigma, inv_sigma, below;
  int32_t n0, n;
  const float* table;
  uint64_t seed, offset;
  Sink sink;
  __device__ __forceinline__ void operator()(const ListView& v, int t, int64_t i, int64_t global,
                                             BlockStats& s) const {
    const float g = to_float(static_cast<const T*>(v.ptr(kIn, t))[i]);
    const DrawThresholds th = mc_thresholds(g, tau, inv_sigma);
    VoteCounts sel{0, 0}, est{0, 0};
    const int32_t draws = n0 + n;
    for (int32_t b = 0; 4 * b < draws; ++b) {
      const PhiloxBlock r = philox_block_for(seed, offset, static_cast<uint64_t>(b), static_cast<uint64_t>(global));
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int32_t j = 4 * b + q;
        const int32_t neg = draw_is_negative(r.w[q], th), pos = draw_is_positive(r.w[q], th);
        if (j < n0) {
          sel.neg += neg;
          sel.pos += pos;
        } else if (j < draws) {
          est.neg += neg;
          est.pos += pos;
        }
      }
    }
    Certified c = certify_from_counts(sel, n0, est, n, table, sigma);
    if (!is_finite_float(g)) c = Certified{0, 0.0f, 0};
    const Decision d{c.code, c.radius};
    sink(v, t, i, d);
    add_stats(s, g, d, c.abstained, below);
  }
};

template <typename T>
struct CountNonfinite {
  __device__ __forceinline__ void operator()(const ListView& v, int t, int64_t i, int64_t, BlockStats& s) const {
    s.nonfinite += !is_finite_float(to_float(static_cast<const T*>(v.ptr(kIn, t))[i]));
  }
};

template <typename T, typename C>
struct VoteOp {
  float tau;
  __device__ __forceinline__ void operator()(const ListView& v, int t, int64_t i, int64_t, BlockStats& s) const {
    const float g = to_float(static_cast<const T*>(v.ptr(kIn, t))[i]);
    const VoteCounts c = ternary_vote(g, tau);
    C* votes = static_cast<C*>(v.ptr(kOutA, t));
    votes[i] += static_cast<C>(c.neg);
    votes[v.numel(t) + i] += static_cast<C>(c.pos);
    s.nonfinite += !is_finite_float(g);
  }
};

// Arrays: codes, radii, selection votes, estimation votes (rows -1 and +1: 2 * numel counts).
template <typename S, typename E>
struct FinalizeOp {
  int32_t n0, n;
  const float* table;
  float sigma, below;
  __device__ __forceinline__ void operator()(const ListView& v, int t, int64_t i, int64_t, BlockStats& s) const {
    const int64_t numel = v.numel(t);
    const S* sel = static_cast<const S*>(v.ptr(2, t));
    const E* est = static_cast<const E*>(v.ptr(3, t));
    const Certified c = certify_from_counts(VoteCounts{sel[i], sel[numel + i]}, n0,
                                            VoteCounts{est[i], est[numel + i]}, n, table, sigma);
    static_cast<int8_t*>(v.ptr(0, t))[i] = c.code;
    static_cast<float*>(v.ptr(1, t))[i] = c.radius;
    add_stats(s, 0.0f, Decision{c.code, c.radius}, c.abstained, below);
  }
};

using QuantizeOut = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor, at::Tensor>;

// Runs a quantize-style op: codes + radii outputs shaped like the gradients.
template <template <typename, typename> class OpT, typename Configure>
QuantizeOut quantize_list(const FlatList& grads, Configure&& configure) {
  ListLaunch launch(grads.tensors[0].device());
  std::vector<at::Tensor> codes = empty_like_list(grads, at::kChar);
  std::vector<at::Tensor> radii = empty_like_list(grads, at::kFloat);
  auto [min_radius, counts] = new_stats(launch.device());
  const ListView view = launch.pack(numels_of(grads.tensors), {grads.tensors, codes, radii}, kChunk);
  dispatch_list(grads.tensors, [&](auto tag) {
    using T = decltype(tag);
    OpT<T, WriteCodes<T>> op{};
    configure(op);
    elements_with_stats(launch, view, op, min_radius, counts);
  });
  return {codes, radii, min_radius, counts};
}

// Runs a step-style op: params updated in place (through contiguous copies if needed).
template <template <typename, typename> class OpT, typename Configure>
std::tuple<at::Tensor, at::Tensor> step_list(at::TensorList params, const FlatList& grads, double step_size,
                                            bool check_finite, Configure&& configure) {
  check_step_lists(params, grads, step_size);
  ListLaunch launch(grads.tensors[0].device());
  const Array work = launch.in_place(params);
  auto [min_radius, counts] = new_stats(launch.device());
  const ListView view = launch.pack(numels_of(grads.tensors), {grads.tensors, work}, kChunk);
  dispatch_list(grads.tensors, [&](auto tag) {
    using T = decltype(tag);
    const int64_t* skip = nullptr;
    if (check_finite) {
      // Counts non-finite entries into counts[1]; the step kernel then returns at once if any, so a
      // bad gradient changes nothing (and no host synchronization is needed).
      elements_with_stats(launch, view, CountNonfinite<T>{}, min_radius, counts);
      skip = counts.data_ptr<int64_t>() + 1;
    }
    OpT<T, ApplyStep<T>> op{};
    op.sink.step = static_cast<float>(step_size);
    configure(op);
    elements_with_stats(launch, view, op, min_radius, counts, skip);
  });
  launch.finish();
  return {min_radius, counts};
}

QuantizeOut quantize_analytic_cuda(at::TensorList grads_in, double beta, double count_below) {
  check_beta(beta);
  const FlatList grads = flatten_float_list(grads_in, "grads");
  TORCH_CHECK(!grads.tensors.empty(), "unlearn_ext: quantize_analytic needs at least one tensor");
  return quantize_list<AnalyticOp>(grads, [&](auto& op) {
    op.beta = static_cast<float>(beta);
    op.below = float32_arg(count_below, "count_below", true);
  });
}

template <typename Op>
void configure_mc(Op& op, double tau, double sigma, int64_t n0, int64_t n, const at::Tensor& table,
                  int64_t seed, int64_t offset, double count_below) {
  op.tau = static_cast<float>(tau);
  op.sigma = static_cast<float>(sigma);
  op.inv_sigma = static_cast<float>(1.0 / sigma);
  op.below = float32_arg(count_below, "count_below", true);
  op.n0 = static_cast<int32_t>(n0);
  op.n = static_cast<int32_t>(n);
  op.table = table.data_ptr<float>();
  op.seed = as_u64(seed);
  op.offset = as_u64(offset);
}

QuantizeOut quantize_mc_cuda(at::TensorList grads_in, double tau, double sigma, int64_t n0, int64_t n,
                             const at::Tensor& table, int64_t seed, int64_t offset, double count_below) {
  const FlatList grads = flatten_float_list(grads_in, "grads");
  check_tau(tau);
  check_mc_arguments(sigma, n0, n, table, grads.tensors.empty() ? table.device() : grads.tensors[0].device());
  if (grads.tensors.empty()) {
    auto [m, c] = new_stats(table.device());
    return {{}, {}, m, c};
  }
  const at::Tensor table_c = table.contiguous();
  return quantize_list<McOp>(grads, [&](auto& op) {
    configure_mc(op, tau, sigma, n0, n, table_c, seed, offset, count_below);
  });
}

std::tuple<at::Tensor, at::Tensor> quantized_step_analytic_cuda(at::TensorList params, at::TensorList grads_in,
                                                                double beta, double step_size,
                                                                double count_below, bool check_finite) {
  check_beta(beta);
  const FlatList grads = flatten_float_list(grads_in, "grads");
  TORCH_CHECK(!grads.tensors.empty(), "unlearn_ext: the step needs at least one tensor");
  return step_list<AnalyticOp>(params, grads, step_size, check_finite, [&](auto& op) {
    op.beta = static_cast<float>(beta);
    op.below = float32_arg(count_below, "count_below", true);
  });
}

std::tuple<at::Tensor, at::Tensor> quantized_step_mc_cuda(at::TensorList params, at::TensorList grads_in,
                                                          double tau, double sigma, int64_t n0, int64_t n,
                                                          const at::Tensor& table, int64_t seed, int64_t offset,
                                                          double step_size, double count_below,
                                                          bool check_finite) {
  const FlatList grads = flatten_float_list(grads_in, "grads");
  TORCH_CHECK(!grads.tensors.empty(), "unlearn_ext: the step needs at least one tensor");
  check_tau(tau);
  check_mc_arguments(sigma, n0, n, table, grads.tensors[0].device());
  const at::Tensor table_c = table.contiguous();
  return step_list<McOp>(params, grads, step_size, check_finite, [&](auto& op) {
    configure_mc(op, tau, sigma, n0, n, table_c, seed, offset, count_below);
  });
}

// params <- params - step_size * code from stored codes (the fused step's update, no statistics).
template <typename T>
struct ApplyCodeOp {
  float step;
  __device__ __forceinline__ void operator()(const ListView& v, int t, int64_t i, int64_t) const {
    T* w = static_cast<T*>(v.ptr(0, t));
    const int8_t code = static_cast<const int8_t*>(v.ptr(1, t))[i];
    w[i] = static_cast<T>(quantized_update(to_float(w[i]), step, code));
  }
};

void apply_codes_cuda(at::TensorList params, at::TensorList codes_in, double step_size) {
  const Array codes = check_apply_codes(params, codes_in, step_size);
  if (params.empty()) return;
  ListLaunch launch(params[0].device());
  const Array work = launch.in_place(params);
  const ListView view = launch.pack(numels_of(work), {work, codes}, kChunk);
  dispatch_list(work, [&](auto tag) {
    using T = decltype(tag);
    launch.elements(view, ApplyCodeOp<T>{static_cast<float>(step_size)});
  });
  launch.finish();
}

at::Tensor vote_accumulate_cuda(at::TensorList votes, at::TensorList grads_in, double tau) {
  check_tau(tau);
  const FlatList grads = flatten_float_list(grads_in, "grads");
  check_vote_list(votes, grads, "votes");
  check_vote_room(votes);
  TORCH_CHECK(!grads.tensors.empty(), "unlearn_ext: vote_accumulate_ needs at least one tensor");
  ListLaunch launch(grads.tensors[0].device());
  auto [min_radius, counts] = new_stats(launch.device());
  const ListView view = launch.pack(numels_of(grads.tensors), {grads.tensors, Array(votes.begin(), votes.end())}, kChunk);
  dispatch_list(grads.tensors, [&](auto tag) {
    using T = decltype(tag);
    const float t = static_cast<float>(tau);
    if (votes[0].scalar_type() == at::kShort)
      elements_with_stats(launch, view, VoteOp<T, int16_t>{t}, min_radius, counts);
    else
      elements_with_stats(launch, view, VoteOp<T, int32_t>{t}, min_radius, counts);
  });
  return counts[1].clone();
}

QuantizeOut vote_finalize_cuda(at::TensorList selection, at::TensorList estimation, int64_t n0, int64_t n,
                               const at::Tensor& table, double sigma, double count_below) {
  const FlatList shapes = vote_finalize_shapes(selection, estimation);
  check_mc_arguments(sigma, n0, n, table, selection[0].device());
  ListLaunch launch(selection[0].device());
  const at::Tensor table_c = table.contiguous();
  std::vector<at::Tensor> codes = empty_like_list(shapes, at::kChar);
  std::vector<at::Tensor> radii = empty_like_list(shapes, at::kFloat);
  auto [min_radius, counts] = new_stats(launch.device());
  // Sized by the coordinates (shapes), so the vote arrays (2 * numel counts) sit in any slot.
  const ListView view = launch.pack(numels_of(shapes.tensors),
                                    {codes, radii, Array(selection.begin(), selection.end()),
                                     Array(estimation.begin(), estimation.end())},
                                    kChunk);
  auto run = [&](auto sel_tag, auto est_tag) {
    using S = decltype(sel_tag);
    using E = decltype(est_tag);
    FinalizeOp<S, E> op{static_cast<int32_t>(n0), static_cast<int32_t>(n), table_c.data_ptr<float>(),
                        static_cast<float>(sigma), float32_arg(count_below, "count_below", true)};
    elements_with_stats(launch, view, op, min_radius, counts);
  };
  const bool sel16 = selection[0].scalar_type() == at::kShort, est16 = estimation[0].scalar_type() == at::kShort;
  if (sel16 && est16) run(int16_t{}, int16_t{});
  else if (sel16) run(int16_t{}, int32_t{});
  else if (est16) run(int32_t{}, int16_t{});
  else run(int32_t{}, int32_t{});
  return {codes, radii, min_radius, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(unlearn_ext, CUDA, m) {
  m.impl("quantize_analytic", &quantize_analytic_cuda);
  m.impl("quantize_mc", &quantize_mc_cuda);
  m.impl("quantized_step_analytic_", &quantized_step_analytic_cuda);
  m.impl("quantized_step_mc_", &quantized_step_mc_cuda);
  m.impl("vote_accumulate_", &vote_accumulate_cuda);
  m.impl("vote_finalize", &vote_finalize_cuda);
  m.impl("apply_codes_", &apply_codes_cuda);
}

}  // namespace cuda
}  // namespace unlearn
