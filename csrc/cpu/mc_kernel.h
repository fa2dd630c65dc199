// The draw-count-certify part of the CPU `mc` kernel (DESIGN section 4, `mc` mode), in two
// implementations with one interface: an AVX-512 one (smoothing_mc_avx512.cpp, compiled for
// AVX-512 whatever the build flags) and a portable scalar one (smoothing_cpu.cpp, written with the
// shared per-element math of unlearn/smoothing.h). Which one runs is decided per call at run time
// (mc_kernel_path), so a portable build still takes the AVX-512 path on a CPU that has it.
//
// Both take the class probabilities of each element (Phi computed by the caller) and produce codes,
// radii and statistics that are identical bit for bit (tests/test_smoothing_ops.py forces each path).
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

void mc_span_scalar(const float* p_neg, const float* p_pos, int64_t count, uint64_t global_begin,
                    const McDrawParams& p, int8_t* codes, float* radii, McSpanStats& stats);

// Defined only on x86-64 (smoothing_mc_avx512.cpp); call only when mc_cpu_has_avx512().
void mc_span_avx512(const float* p_neg, const float* p_pos, int64_t count, uint64_t global_begin,
                    const McDrawParams& p, int8_t* codes, float* radii, McSpanStats& stats);

// True when the AVX-512 path is compiled in and this CPU (and OS) supports it.
bool mc_cpu_has_avx512();

// "avx512" or "scalar": the path the next `mc` call takes. The environment variable
// UNLEARN_EXT_MC_KERNEL=scalar forces the scalar path (read at every call; for tests and for
// comparing the two); any other value, or none, picks AVX-512 where available.
const char* mc_kernel_path();

// The function behind mc_kernel_path().
McSpanFn mc_span_function();

}  // namespace cpu
}  // namespace unlearn
