// The draw-count-certify part of the CPU `mc` kernel (DESIGN section 4, `mc` mode), in four
// implementations with one interface: hand-written AVX-512 and AVX2 ones (smoothing_mc_avx512.cpp,
// smoothing_mc_avx2.cpp, each compiled for its ISA whatever the build flags), a hand-written NEON one
// for aarch64 (smoothing_mc_neon.cpp) and a portable one (smoothing_mc_scalar.cpp, written with the
// shared per-element math of unlearn/smoothing.h). They differ only in how they draw and count (and the
// AVX-512 one in how it reads CERTIFY's radius table: one vector gather, the same entries); the
// rest of a span (groups and tail, thresholds, block phases, CERTIFY, stores, statistics) is
// mc_group.h, compiled into each. Each ISA copy of smoothing_cpu.cpp calls its own (isa.h: the path
// is chosen per call at run time, so a portable build still takes the widest path the CPU has).
//
// All take the class probabilities of each element (Phi computed by the caller) and produce codes,
// radii and statistics that are identical bit for bit (tests/test_cpu_isa.py forces each path; the
// NEON one is also checked under emulation by tests/native/neon_bit_identity.cpp).
#pragma once

#include <cstdint>

namespace unlearn {
namespace cpu {

struct McDrawParams {
  uint64_t seed, offset;
  int32_t n0, n;              // selection and estimation draws per element
  float sigma;
  float below_threshold;      // radii below this are counted (the `count_below` argument)
  const float* radius_table;  // n + 1 entries: PhiInv(Clopper-Pearson lower bound of k / n)
};

// Statistics of one span, with the meaning of smoothing_cpu.cpp's Stats.
struct McSpanStats {
  int32_t min_radius_bits = 0x7f800000;  // +inf; radii are >= 0, so int order = float order
  int64_t abstained = 0;
  int64_t nonfinite = 0;
  int64_t below = 0;
};

// For element i of the span (global index global_begin + i): p_neg[i], p_pos[i] are its class
// probabilities as float (Phi of its standardized distances); both NaN marks a non-finite input,
// whose code and radius are 0. Writes codes[i], radii[i] for i < count and adds to `stats`.
using McSpanFn = void (*)(const float* p_neg, const float* p_pos, int64_t count, uint64_t global_begin,
                          const McDrawParams& p, int8_t* codes, float* radii, McSpanStats& stats);

// The portable path: built everywhere, taken by the scalar copy of smoothing_cpu.cpp.
void mc_span_scalar(const float* p_neg, const float* p_pos, int64_t count, uint64_t global_begin,
                    const McDrawParams& p, int8_t* codes, float* radii, McSpanStats& stats);

// Defined only where the x86 copies are built (UNLEARN_X86_VARIANTS, isa.h); called only by the
// copy of smoothing_cpu.cpp for the same ISA, which runs only on CPUs that have it.
void mc_span_avx512(const float* p_neg, const float* p_pos, int64_t count, uint64_t global_begin,
                    const McDrawParams& p, int8_t* codes, float* radii, McSpanStats& stats);
void mc_span_avx2(const float* p_neg, const float* p_pos, int64_t count, uint64_t global_begin,
                  const McDrawParams& p, int8_t* codes, float* radii, McSpanStats& stats);

// Defined only on aarch64 (UNLEARN_NEON_VARIANT, isa.h); called only by the neon copy of smoothing_cpu.cpp.
void mc_span_neon(const float* p_neg, const float* p_pos, int64_t count, uint64_t global_begin,
                  const McDrawParams& p, int8_t* codes, float* radii, McSpanStats& stats);

}  // namespace cpu
}  // namespace unlearn
