// CPU kernels of the smoothing + quantization family: quantize_analytic, quantize_mc, their fused
// SGD-step variants, and the vote counters of framework D. The per-element math is in
// unlearn/smoothing.h; this file only walks elements and reduces.
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_walk.h"
#include "mc_kernel.h"
#include "per_isa_ops.h"
#include "unlearn/smoothing.h"
#include "unlearn/smoothing_checks.h"

#include "isa_target.h"  // from here on: this copy's ISA (isa.h)

namespace unlearn {
namespace cpu {
namespace UNLEARN_ISA {
namespace {

// The partial result of one chunk of the list walk (cpu_walk.h). The minimum radius is kept as the
// bit pattern of a non-negative float, whose integer order equals its float order and whose
// min-reduction vectorizes without -ffast-math.
struct Stats {
  int32_t min_radius_bits = 0x7f800000;  // +inf
  int64_t abstained = 0;
  int64_t nonfinite = 0;
  int64_t below = 0;

  void merge(const Stats& o) {
    min_radius_bits = std::min(min_radius_bits, o.min_radius_bits);
    abstained += o.abstained;
    nonfinite += o.nonfinite;
    below += o.below;
  }
};

// (min_radius: float32 scalar, counts: int64[3]) as the ops return them.
std::tuple<at::Tensor, at::Tensor> stats_tensors(const Stats& s, const at::TensorOptions& opts) {
  at::Tensor min_radius = at::empty({}, opts.dtype(at::kFloat));
  min_radius.fill_(bits_float(s.min_radius_bits));
  at::Tensor counts = at::empty({3}, opts.dtype(at::kLong));
  int64_t* c = counts.data_ptr<int64_t>();
  c[0] = s.abstained;
  c[1] = s.nonfinite;
  c[2] = s.below;
  return {min_radius, counts};
}

// ---- analytic ----------------------------------------------------------------------------------

// Visits every element of a span with its analytic decision; emit(i, decision) consumes it.
template <typename T, typename Emit>
void analytic_span(const T* g, int64_t count, float beta, float below_threshold, Stats& s, Emit&& emit) {
  int32_t min_bits = s.min_radius_bits;
  int32_t nonfinite = 0, below = 0;
  for (int64_t i = 0; i < count; ++i) {
    const float v = load_float(g[i]);
    const Decision d = analytic_decision(v, beta);
    emit(i, d);
    nonfinite += !is_finite_float(v);
    below += d.radius < below_threshold;
    const int32_t b = float_bits(d.radius);
    min_bits = b < min_bits ? b : min_bits;
  }
  s.min_radius_bits = min_bits;
  s.nonfinite += nonfinite;
  s.below += below;
}

// ---- Monte-Carlo -------------------------------------------------------------------------------
// Phi is computed here for a whole span; the draws, counts and CERTIFY run in mc_span_scalar
// (smoothing_mc_scalar.cpp) or in its hand-written twins (smoothing_mc_avx2.cpp, smoothing_mc_avx512.cpp,
// smoothing_mc_neon.cpp): each copy of this file takes the one of its ISA (kMcSpan).

// This copy's draw-count-certify path.
#if defined(UNLEARN_ISA_AVX512)
constexpr McSpanFn kMcSpan = &mc_span_avx512;
#elif defined(UNLEARN_ISA_AVX2)
constexpr McSpanFn kMcSpan = &mc_span_avx2;
#elif defined(UNLEARN_ISA_NEON)
constexpr McSpanFn kMcSpan = &mc_span_neon;
#else
constexpr McSpanFn kMcSpan = &mc_span_scalar;
#endif

struct McParams {
  float tau, inv_sigma;
  McDrawParams draws;
  McSpanFn span_fn;  // the path chosen for this call
};

McParams make_mc_params(double tau, double sigma, int64_t n0, int64_t n, const at::Tensor& table,
                        int64_t seed, int64_t offset, float below_threshold) {
  return McParams{static_cast<float>(tau), static_cast<float>(1.0 / sigma),
                  McDrawParams{as_u64(seed), as_u64(offset), static_cast<int32_t>(n0), static_cast<int32_t>(n),
                               static_cast<float>(sigma), below_threshold, table.data_ptr<float>()},
                  kMcSpan};
}

// Class probabilities of every element of a span: p_neg = Phi((-tau - v) / sigma) and
// p_pos = Phi((v - tau) / sigma) as in mc_thresholds (unlearn/smoothing.h), NaN for non-finite v
// (the mark mc_kernel.h expects), into prob = [p_neg (count), p_pos (count)]. Phi comes from
// ATen's vectorized erfc (the same function torch.special.erfc and so the reference use): glibc's
// scalar erfcf cost ~40 ns per call here.
template <typename T>
void mc_probabilities_span(const T* g, int64_t count, const McParams& p, float* prob) {
  float* p_neg = prob;
  float* p_pos = prob + count;
  constexpr float kInvSqrt2 = 0.70710678118654752f;
  for (int64_t i = 0; i < count; ++i) {
    const float v = load_float(g[i]);
    // normal_cdf(x) = erfc(-x / sqrt 2) / 2, exactly as in unlearn/smoothing.h.
    p_pos[i] = -((v - p.tau) * p.inv_sigma) * kInvSqrt2;
    p_neg[i] = -((-p.tau - v) * p.inv_sigma) * kInvSqrt2;
  }
  at::Tensor both = at::from_blob(prob, {2 * count}, at::kFloat);  // one erfc call for both
  at::erfc_out(both, both);
  for (int64_t i = 0; i < count; ++i) {
    const bool finite = is_finite_float(load_float(g[i]));
    const float nan = std::numeric_limits<float>::quiet_NaN();
    p_neg[i] = finite ? 0.5f * p_neg[i] : nan;
    p_pos[i] = finite ? 0.5f * p_pos[i] : nan;
  }
}

// Where a quantize writes its decisions: straight into the output tensors (no per-element callback,
// so the `mc` kernel can store 16 lanes at once).
struct OutputSink {
  int8_t* code;
  float* radius;
  void operator()(int64_t i, Decision d) const {
    code[i] = d.code;
    radius[i] = d.radius;
  }
};

// Per-thread scratch reused across spans and calls: fresh 100+ KB buffers per span cost page faults.
template <typename T>
T* scratch(std::vector<T>& buf, int64_t count) {
  if (buf.size() < static_cast<size_t>(count)) buf.resize(static_cast<size_t>(count));
  return buf.data();
}

// Phi for the span, then the chosen path: into the outputs directly (OutputSink), or into scratch
// codes and radii handed to emit(i, decision) (the fused step).
template <typename T, typename Emit>
void mc_span(const T* g, int64_t count, uint64_t global_begin, const McParams& p, Stats& s, Emit&& emit) {
  thread_local std::vector<float> prob_buf, radii_buf;
  thread_local std::vector<int8_t> codes_buf;
  float* prob = scratch(prob_buf, 2 * count);
  mc_probabilities_span(g, count, p, prob);
  McSpanStats ms;
  ms.min_radius_bits = s.min_radius_bits;
  if constexpr (std::is_same_v<std::decay_t<Emit>, OutputSink>) {
    p.span_fn(prob, prob + count, count, global_begin, p.draws, emit.code, emit.radius, ms);
  } else {
    int8_t* codes = scratch(codes_buf, count);
    float* radii = scratch(radii_buf, count);
    p.span_fn(prob, prob + count, count, global_begin, p.draws, codes, radii, ms);
    for (int64_t i = 0; i < count; ++i) emit(i, Decision{codes[i], radii[i]});
  }
  s.min_radius_bits = ms.min_radius_bits;
  s.abstained += ms.abstained;
  s.nonfinite += ms.nonfinite;
  s.below += ms.below;
}

// ---- shared drivers ----------------------------------------------------------------------------

// Counts non-finite gradient entries (the pre-scan that lets a step refuse to apply anything).
int64_t count_nonfinite(const FlatList& grads) {
  Stats s = parallel_over_list<Stats>(grads.offsets, [&](Stats& st, size_t t, int64_t lo, int64_t hi, int64_t) {
    dispatch_float_type(grads.tensors[t].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      const T* g = grads.tensors[t].data_ptr<T>() + lo;
      int32_t bad = 0;
      for (int64_t i = 0; i < hi - lo; ++i) bad += !is_finite_float(load_float(g[i]));
      st.nonfinite += bad;
    });
  });
  return s.nonfinite;
}

// Quantize: writes codes (int8) and radii (float32) shaped like the gradients.
template <typename SpanFn>
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor, at::Tensor> quantize_list(
    const FlatList& grads, SpanFn&& span) {
  std::vector<at::Tensor> codes = empty_like_list(grads, at::kChar);
  std::vector<at::Tensor> radii = empty_like_list(grads, at::kFloat);
  Stats s = parallel_over_list<Stats>(grads.offsets, [&](Stats& st, size_t t, int64_t lo, int64_t hi, int64_t g0) {
    int8_t* code = codes[t].data_ptr<int8_t>() + lo;
    float* radius = radii[t].data_ptr<float>() + lo;
    dispatch_float_type(grads.tensors[t].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      span(grads.tensors[t].data_ptr<T>() + lo, hi - lo, g0, st, OutputSink{code, radius});
    });
  });
  auto [min_radius, counts] = stats_tensors(s, grads.tensors.empty() ? at::TensorOptions() : grads.tensors[0].options());
  return {codes, radii, min_radius, counts};
}

// Step: w <- w - step_size * code in place, with the same statistics as quantize.
template <typename SpanFn>
std::tuple<at::Tensor, at::Tensor> step_list(at::TensorList params, const FlatList& grads,
                                            double step_size, bool check_finite, SpanFn&& span) {
  check_step_lists(params, grads, step_size);
  const at::TensorOptions opts = grads.tensors[0].options();
  if (check_finite) {
    const int64_t bad = count_nonfinite(grads);
    if (bad > 0) {
      Stats skipped;
      skipped.nonfinite = bad;
      return stats_tensors(skipped, opts);  // nothing applied
    }
  }
  // Non-contiguous parameters are updated through a contiguous copy that is written back.
  std::vector<at::Tensor> work = contiguous_work(params);
  const float step = static_cast<float>(step_size);
  Stats s = parallel_over_list<Stats>(grads.offsets, [&](Stats& st, size_t t, int64_t lo, int64_t hi, int64_t g0) {
    dispatch_float_type(grads.tensors[t].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      T* w = work[t].data_ptr<T>() + lo;
      span(grads.tensors[t].data_ptr<T>() + lo, hi - lo, g0, st, [&](int64_t i, Decision d) {
        w[i] = store_as<T>(quantized_update(load_float(w[i]), step, d.code));
      });
    });
  });
  write_back(params, work);
  return stats_tensors(s, opts);
}

// ---- op implementations ------------------------------------------------------------------------

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor, at::Tensor> quantize_analytic_cpu(
    at::TensorList grads_in, double beta, double count_below) {
  check_beta(beta);
  const FlatList grads = flatten_float_list(grads_in, "grads");
  const float b = static_cast<float>(beta), thr = float32_arg(count_below, "count_below", true);
  return quantize_list(grads, [&](auto* g, int64_t n, int64_t, Stats& st, auto&& emit) {
    analytic_span(g, n, b, thr, st, emit);
  });
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor, at::Tensor> quantize_mc_cpu(
    at::TensorList grads_in, double tau, double sigma, int64_t n0, int64_t n, const at::Tensor& table,
    int64_t seed, int64_t offset, double count_below) {
  const FlatList grads = flatten_float_list(grads_in, "grads");
  check_tau(tau);
  check_mc_arguments(sigma, n0, n, table, grads.tensors.empty() ? table.device() : grads.tensors[0].device());
  const at::Tensor table_c = table.contiguous();
  const float thr = float32_arg(count_below, "count_below", true);
  const McParams p = make_mc_params(tau, sigma, n0, n, table_c, seed, offset, thr);
  return quantize_list(grads, [&](auto* g, int64_t cnt, int64_t g0, Stats& st, auto&& emit) {
    mc_span(g, cnt, static_cast<uint64_t>(g0), p, st, emit);
  });
}

std::tuple<at::Tensor, at::Tensor> quantized_step_analytic_cpu(at::TensorList params,
                                                               at::TensorList grads_in, double beta,
                                                               double step_size, double count_below,
                                                               bool check_finite) {
  check_beta(beta);
  const FlatList grads = flatten_float_list(grads_in, "grads");
  TORCH_CHECK(!grads.tensors.empty(), "unlearn_ext: the step needs at least one tensor");
  const float b = static_cast<float>(beta), thr = float32_arg(count_below, "count_below", true);
  return step_list(params, grads, step_size, check_finite, [&](auto* g, int64_t n, int64_t, Stats& st, auto&& emit) {
    analytic_span(g, n, b, thr, st, emit);
  });
}

std::tuple<at::Tensor, at::Tensor> quantized_step_mc_cpu(at::TensorList params, at::TensorList grads_in,
                                                         double tau, double sigma, int64_t n0, int64_t n,
                                                         const at::Tensor& table, int64_t seed,
                                                         int64_t offset, double step_size,
                                                         double count_below, bool check_finite) {
  const FlatList grads = flatten_float_list(grads_in, "grads");
  TORCH_CHECK(!grads.tensors.empty(), "unlearn_ext: the step needs at least one tensor");
  check_tau(tau);
  check_mc_arguments(sigma, n0, n, table, grads.tensors[0].device());
  const at::Tensor table_c = table.contiguous();
  const float thr = float32_arg(count_below, "count_below", true);
  const McParams p = make_mc_params(tau, sigma, n0, n, table_c, seed, offset, thr);
  return step_list(params, grads, step_size, check_finite, [&](auto* g, int64_t cnt, int64_t g0, Stats& st, auto&& emit) {
    mc_span(g, cnt, static_cast<uint64_t>(g0), p, st, emit);
  });
}

// ---- replaying codes ----------------------------------------------------------------------------

// params <- params - step_size * code: the update of the fused step (quantized_update), from stored
// codes, so a replay rounds exactly like the step that produced them.
void apply_codes_cpu(at::TensorList params, at::TensorList codes_in, double step_size) {
  const std::vector<at::Tensor> codes = check_apply_codes(params, codes_in, step_size);
  if (params.empty()) return;
  std::vector<at::Tensor> work = contiguous_work(params);
  std::vector<int64_t> offsets{0};
  for (const auto& w : work) offsets.push_back(offsets.back() + w.numel());
  const float step = static_cast<float>(step_size);
  dispatch_float_type(params[0].scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    for_each_chunk(offsets, [&](int64_t, size_t t, int64_t lo, int64_t hi, int64_t) {
      T* w = work[t].data_ptr<T>();
      const int8_t* c = codes[t].data_ptr<int8_t>();
      for (int64_t i = lo; i < hi; ++i) w[i] = store_as<T>(quantized_update(load_float(w[i]), step, c[i]));
    });
  });
  write_back(params, work);
}

// ---- framework D: vote counters ----------------------------------------------------------------

at::Tensor vote_accumulate_cpu(at::TensorList votes, at::TensorList grads_in, double tau) {
  check_tau(tau);
  const FlatList grads = flatten_float_list(grads_in, "grads");
  check_vote_list(votes, grads, "votes");
  check_vote_room(votes);
  const float t = static_cast<float>(tau);
  Stats s = parallel_over_list<Stats>(grads.offsets, [&](Stats& st, size_t ti, int64_t lo, int64_t hi, int64_t) {
    const int64_t numel = grads.tensors[ti].numel();
    dispatch_float_type(grads.tensors[ti].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      const T* g = grads.tensors[ti].data_ptr<T>() + lo;
      auto add_votes = [&](auto* counts) {
        auto* neg = counts + lo;
        auto* pos = counts + numel + lo;
        int32_t bad = 0;
        for (int64_t i = 0; i < hi - lo; ++i) {
          const float v = load_float(g[i]);
          const VoteCounts c = ternary_vote(v, t);
          neg[i] += c.neg;
          pos[i] += c.pos;
          bad += !is_finite_float(v);
        }
        st.nonfinite += bad;
      };
      if (votes[ti].scalar_type() == at::kShort) add_votes(votes[ti].data_ptr<int16_t>());
      else add_votes(votes[ti].data_ptr<int32_t>());
    });
  });
  at::Tensor out = at::empty({}, at::TensorOptions().dtype(at::kLong));
  out.fill_(s.nonfinite);
  return out;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor, at::Tensor> vote_finalize_cpu(
    at::TensorList selection, at::TensorList estimation, int64_t n0, int64_t n, const at::Tensor& table,
    double sigma, double count_below) {
  const FlatList shapes = vote_finalize_shapes(selection, estimation);
  check_mc_arguments(sigma, n0, n, table, selection[0].device());
  const at::Tensor table_c = table.contiguous();
  const float* tab = table_c.data_ptr<float>();
  const float sig = static_cast<float>(sigma), thr = float32_arg(count_below, "count_below", true);
  std::vector<at::Tensor> codes = empty_like_list(shapes, at::kChar);
  std::vector<at::Tensor> radii = empty_like_list(shapes, at::kFloat);
  Stats s = parallel_over_list<Stats>(shapes.offsets, [&](Stats& st, size_t t, int64_t lo, int64_t hi, int64_t) {
    const int64_t numel = shapes.tensors[t].numel();
    int8_t* code = codes[t].data_ptr<int8_t>();
    float* radius = radii[t].data_ptr<float>();
    auto finalize = [&](const auto* sel, const auto* est) {
      for (int64_t i = lo; i < hi; ++i) {
        const Certified c = certify_from_counts(VoteCounts{sel[i], sel[numel + i]}, static_cast<int32_t>(n0),
                                                VoteCounts{est[i], est[numel + i]}, static_cast<int32_t>(n), tab, sig);
        code[i] = c.code;
        radius[i] = c.radius;
        st.abstained += c.abstained;
        st.below += c.radius < thr;
        st.min_radius_bits = std::min(st.min_radius_bits, float_bits(c.radius));
      }
    };
    const bool sel16 = selection[t].scalar_type() == at::kShort, est16 = estimation[t].scalar_type() == at::kShort;
    if (sel16 && est16) finalize(selection[t].data_ptr<int16_t>(), estimation[t].data_ptr<int16_t>());
    else if (sel16) finalize(selection[t].data_ptr<int16_t>(), estimation[t].data_ptr<int32_t>());
    else if (est16) finalize(selection[t].data_ptr<int32_t>(), estimation[t].data_ptr<int16_t>());
    else finalize(selection[t].data_ptr<int32_t>(), estimation[t].data_ptr<int32_t>());
  });
  auto [min_radius, counts] = stats_tensors(s, selection[0].options());
  return {codes, radii, min_radius, counts};
}

}  // namespace

#define UNLEARN_SMOOTHING_OPS(X)                            \
  X("quantize_analytic", quantize_analytic_cpu)             \
  X("quantize_mc", quantize_mc_cpu)                         \
  X("quantized_step_analytic_", quantized_step_analytic_cpu) \
  X("quantized_step_mc_", quantized_step_mc_cpu)            \
  X("vote_accumulate_", vote_accumulate_cpu)                \
  X("vote_finalize", vote_finalize_cpu)                     \
  X("apply_codes_", apply_codes_cpu)

}  // namespace UNLEARN_ISA
}  // namespace cpu
}  // namespace unlearn

#include "isa_target_end.h"

// Exported by every copy, registered once by the scalar copy (per_isa_ops.h).
UNLEARN_PER_ISA_OPS(UNLEARN_SMOOTHING_OPS)
