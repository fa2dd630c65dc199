// Which vector path the CPU kernels take: chosen at run time, per call, from what this CPU supports.
//
// The hot kernel files (smoothing_cpu.cpp, select_cpu.cpp, codecs_cpu.cpp) are compiled once per
// path, the way PyTorch compiles its own CPU kernels once per capability: the file itself is the
// `scalar` copy (the build's baseline ISA: x86-64 or aarch64, no -march=native), and isa/*.cpp
// include it again with UNLEARN_ISA_AVX2 or UNLEARN_ISA_AVX512 (x86-64) or UNLEARN_ISA_NEON (aarch64)
// defined, which switches the code after isa_target.h to that ISA (#pragma GCC target; NEON is
// aarch64's baseline and needs none) and into a namespace of its own. The `neon` copy differs from the
// scalar one only where a kernel has hand-written NEON code (philox_neon.h, smoothing_mc_neon.cpp);
// the scalar copy stays as the portable path the others are tested against. Each copy exports a
// table of its ops (per_isa_ops.h); the scalar copy registers the ops once and every call looks up
// the table of the path chosen now.
//
// What is compiled for the wider ISA is only our own code after isa_target.h: torch's headers and the
// shared per-element math (unlearn/*.h) are included before it, so every inline function they emit is
// baseline code in every object file, and the linker can never hand an AVX-512 copy of one to code
// that runs on a CPU without it.
#pragma once

#include <string>
#include <vector>

// The x86 copies are built with GCC on x86-64 (its #pragma GCC target; Clang builds get the scalar
// copy only). The neon copy is built on aarch64 (any compiler with arm_neon.h: NEON is baseline there,
// so no target switch is needed). Other CPUs get the scalar copy only.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define UNLEARN_X86_VARIANTS 1
#else
#define UNLEARN_X86_VARIANTS 0
#endif
#if defined(__aarch64__) && defined(__ARM_NEON)
#define UNLEARN_NEON_VARIANT 1
#else
#define UNLEARN_NEON_VARIANT 0
#endif

namespace unlearn {
namespace cpu {

enum class CpuIsa : int { scalar = 0, avx2 = 1, avx512 = 2, neon = 3 };

const char* isa_name(CpuIsa isa);

// The paths this CPU (and OS) can run and this build contains, narrowest first.
std::vector<CpuIsa> supported_isas();

// The path the next kernel call takes: the widest supported one, or the one named by the
// environment variable UNLEARN_EXT_CPU_ISA (scalar, avx2, avx512 or neon; read at every call, for tests and
// comparisons). A name that is unknown or that this CPU cannot run is refused with an error.
CpuIsa chosen_isa();

}  // namespace cpu
}  // namespace unlearn
