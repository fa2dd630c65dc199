// Switches the rest of a kernel file to its copy's ISA (isa.h explains the scheme). Include it after
// torch's headers and the shared unlearn/*.h math, and before the kernel-private headers that should
// be compiled for the ISA (select_keys.h); close with isa_target_end.h.
#include "isa.h"

// The namespace of this copy's code.
#if defined(UNLEARN_ISA_AVX512)
#define UNLEARN_ISA avx512
#elif defined(UNLEARN_ISA_AVX2)
#define UNLEARN_ISA avx2
#elif defined(UNLEARN_ISA_NEON)
#define UNLEARN_ISA neon
#else
#define UNLEARN_ISA scalar
#endif

#if defined(UNLEARN_ISA_AVX512) || defined(UNLEARN_ISA_AVX2)
#if !UNLEARN_X86_VARIANTS
#error "the AVX2 / AVX-512 copies need GCC on x86-64 (isa/*.cpp compile to nothing elsewhere)"
#endif
#pragma GCC push_options
#if defined(UNLEARN_ISA_AVX512)
#pragma GCC target("avx2,fma,bmi,bmi2,popcnt,lzcnt,avx512f,avx512bw,avx512dq,avx512vl")
#else
#pragma GCC target("avx2,fma,bmi,bmi2,popcnt,lzcnt")
#endif
#include <immintrin.h>
#endif

// NEON is aarch64's baseline: the neon copy needs no target switch, only the intrinsics.
#if defined(UNLEARN_ISA_NEON)
#if !UNLEARN_NEON_VARIANT
#error "the neon copies need aarch64 (isa/*_neon.cpp compile to nothing elsewhere)"
#endif
#include <arm_neon.h>
#endif
