// Run-time choice of the CPU kernels' vector path (isa.h).
#include "isa.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

namespace unlearn {
namespace cpu {

const char* isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::avx512: return "avx512";
    case CpuIsa::avx2: return "avx2";
    case CpuIsa::neon: return "neon";
    default: return "scalar";
  }
}

namespace {

// Every path, narrowest first within its architecture.
constexpr CpuIsa kAllIsas[] = {CpuIsa::scalar, CpuIsa::avx2, CpuIsa::avx512, CpuIsa::neon};

bool cpu_can_run(CpuIsa isa) {
  if (isa == CpuIsa::scalar) return true;
#if UNLEARN_NEON_VARIANT
  return isa == CpuIsa::neon;  // NEON (Advanced SIMD) is part of every aarch64 CPU
#elif UNLEARN_X86_VARIANTS
  // __builtin_cpu_supports also checks that the OS saves the wider registers' state (XCR0).
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                           __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt");
  static const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  if (isa == CpuIsa::avx2) return avx2;
  return isa == CpuIsa::avx512 && avx512;
#else
  return false;
#endif
}

}  // namespace

std::vector<CpuIsa> supported_isas() {
  std::vector<CpuIsa> out;
  for (CpuIsa isa : kAllIsas)
    if (cpu_can_run(isa)) out.push_back(isa);
  return out;
}

CpuIsa chosen_isa() {
  const char* forced = std::getenv("UNLEARN_EXT_CPU_ISA");
  if (forced == nullptr || forced[0] == '\0') return supported_isas().back();
  for (CpuIsa isa : kAllIsas) {
    if (std::strcmp(forced, isa_name(isa)) != 0) continue;
    TORCH_CHECK(cpu_can_run(isa), "unlearn_ext: UNLEARN_EXT_CPU_ISA=", forced,
                " names a path this CPU or build cannot run (supported here: ",
                isa_name(supported_isas().back()), " and narrower)");
    return isa;
  }
  TORCH_CHECK(false, "unlearn_ext: UNLEARN_EXT_CPU_ISA=", forced, " is not a path name (scalar, avx2, avx512 or neon)");
}

}  // namespace cpu
}  // namespace unlearn
