// Per-element math of the smoothing family (smoothed ternary quantization, votes, the fused step and
// apply_codes), written once for CPU and CUDA
// (DESIGN section 2: "one kernel body, two backends"). The CPU and CUDA files differ only in how
// they walk elements and reduce; every function here is what both of them compute per coordinate.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "unlearn/float_math.h"
#include "unlearn/macros.h"
#include "unlearn/philox.h"

namespace unlearn {

// Codes are the ternary classes -1, 0, +1.
struct Decision {
  int8_t code;
  float radius;  // certified distance (in gradient units) the input may move without changing code
};

// A radius computed in float may round up past the exact distance by half an ulp. Scaling by
// (1 - 2^-22) before the final rounding lowers any positive normal value by at least one ulp, so
// the stored radius never exceeds the exact one (subnormal results of a subtraction are exact).
UE_HOST_DEVICE float round_radius_down(float r) { return r * (1.0f - 0x1p-22f); }

// ---- analytic mode -------------------------------------------------------------------------------
// The argmax of the smoothed class probabilities (ties to 0) is a threshold quantizer at +-beta,
// where beta(tau, sigma) solves p+ = p0 (computed once on the host, see unlearn_ext/smoothing.py).
// The exact distance to the decision boundary is | |v| - beta |.
UE_HOST_DEVICE Decision analytic_decision(float v, float beta) {
  if (!is_finite_float(v)) return Decision{0, 0.0f};
  const int8_t code = v > beta ? int8_t(1) : (v < -beta ? int8_t(-1) : int8_t(0));
  const float radius = round_radius_down(fabsf(fabsf(v) - beta));
  return Decision{code, radius};
}

// ---- Monte-Carlo mode ----------------------------------------------------------------------------
// A draw adds sigma * Z to v and quantizes at +-tau. Its class is -1 with probability
// p- = Phi((-tau - v) / sigma) and +1 with p+ = Phi((v - tau) / sigma). With a uniform u per draw
// (section 3): class -1 if u < p-, +1 if u > 1 - p+, else 0. Instead of forming u, the kernels
// compare the 24-bit level k = word >> 8 with integer thresholds that give identical answers:
//   u < p-       <=>  k <  neg_levels            (neg_levels = levels_below(p-))
//   u > 1 - p+   <=>  k >= pos_start             (pos_start = 2^24 - levels_below(p+))
struct DrawThresholds {
  int32_t neg_levels;  // k < neg_levels          -> class -1
  int32_t pos_start;   // k >= pos_start (and not -1) -> class +1
};

// Standard normal CDF from the side that keeps relative accuracy in both tails.
UE_HOST_DEVICE float normal_cdf(float x) { return 0.5f * erfcf(-x * 0.70710678118654752f); }

UE_HOST_DEVICE DrawThresholds mc_thresholds(float v, float tau, float inv_sigma) {
  if (!is_finite_float(v)) return DrawThresholds{0, static_cast<int32_t>(kUniformLevels)};
  const float p_pos = normal_cdf((v - tau) * inv_sigma);
  const float p_neg = normal_cdf((-tau - v) * inv_sigma);
  return DrawThresholds{static_cast<int32_t>(levels_below(p_neg)),
                        static_cast<int32_t>(kUniformLevels - levels_below(p_pos))};
}

UE_HOST_DEVICE int32_t draw_is_negative(uint32_t word, DrawThresholds t) {
  return static_cast<int32_t>(uniform_level(word)) < t.neg_levels;
}
UE_HOST_DEVICE int32_t draw_is_positive(uint32_t word, DrawThresholds t) {
  const int32_t k = static_cast<int32_t>(uniform_level(word));
  return (k >= t.pos_start) & (k >= t.neg_levels);
}

// Counts of classes -1 and +1 over a run of draws; class 0 is the rest.
struct VoteCounts {
  int32_t neg;
  int32_t pos;
};

// Cohen et al.'s CERTIFY from counts. Selection draws pick the class c_A (ties: 0, then +1, then
// -1); estimation draws count k_A; radius_table[k_A] = PhiInv(Clopper-Pearson lower bound of
// k_A / n), prepared on the host and already rounded down. A non-positive entry means
// pA_low <= 1/2: abstain (code 0, radius 0).
struct Certified {
  int8_t code;
  float radius;
  int32_t abstained;
};

UE_HOST_DEVICE int32_t select_class(VoteCounts selection, int32_t n0) {
  const int32_t zero = n0 - selection.neg - selection.pos;
  if (zero >= selection.pos && zero >= selection.neg) return 0;
  return selection.pos >= selection.neg ? 1 : -1;
}

// CERTIFY in two steps around the table read, for callers that batch the reads (the CPU `mc` kernel
// reads a group's entries in one gather): which class and which count index the table
// (certify_index), then the answer from the entry read there (certify_from_entry).
// (32-bit class values: lane loops over them vectorize at full width.)
struct CertifyIndex {
  int32_t c_a;
  int32_t k_a;  // in [0, n]
};

UE_HOST_DEVICE CertifyIndex certify_index(VoteCounts selection, int32_t n0, VoteCounts estimation, int32_t n) {
  const int32_t c_a = select_class(selection, n0);
  int32_t k_a =
      c_a == 0 ? n - estimation.neg - estimation.pos : (c_a > 0 ? estimation.pos : estimation.neg);
  // Counts come from callers' tensors in vote_finalize: keep the table read in bounds whatever
  // they hold (the Python layer reports inconsistent counts as an error).
  k_a = k_a < 0 ? 0 : (k_a > n ? n : k_a);
  return CertifyIndex{c_a, k_a};
}

// The answer from the entry, part by part (32-bit values, so that lane loops over them vectorize at
// full width), and whole. Branch-free selects: whether a coordinate abstains is data-dependent and
// unpredictable.
UE_HOST_DEVICE int32_t abstains(float phi_inv_low) { return !(phi_inv_low > 0.0f); }
UE_HOST_DEVICE int32_t certified_class(int32_t c_a, float phi_inv_low) { return abstains(phi_inv_low) ? 0 : c_a; }
UE_HOST_DEVICE float certified_radius(float phi_inv_low, float sigma) {
  return abstains(phi_inv_low) ? 0.0f : round_radius_down(sigma * phi_inv_low);
}

UE_HOST_DEVICE Certified certify_from_entry(int32_t c_a, float phi_inv_low, float sigma) {
  return Certified{static_cast<int8_t>(certified_class(c_a, phi_inv_low)), certified_radius(phi_inv_low, sigma),
                   abstains(phi_inv_low)};
}

UE_HOST_DEVICE Certified certify_from_counts(VoteCounts selection, int32_t n0, VoteCounts estimation,
                                             int32_t n, const float* radius_table, float sigma) {
  const CertifyIndex i = certify_index(selection, n0, estimation, n);
  return certify_from_entry(i.c_a, radius_table[i.k_a], sigma);
}

// ---- data smoothing (framework D) ----------------------------------------------------------------
// One gradient computed on noisy inputs votes for q_tau(v); the noise already lives in the data.
UE_HOST_DEVICE VoteCounts ternary_vote(float v, float tau) {
  return VoteCounts{static_cast<int32_t>(v < -tau), static_cast<int32_t>(v > tau)};
}

// ---- the fused SGD step --------------------------------------------------------------------------
// w <- w - step_size * code, in fp32 math. step_size * code is exact, so the update rounds once and
// is replayable bit for bit from the codes.
UE_HOST_DEVICE float quantized_update(float w, float step_size, int8_t code) {
  return w - step_size * static_cast<float>(code);
}

}  // namespace unlearn
