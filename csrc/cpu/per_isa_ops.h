// Exporting a kernel file's ops from each ISA copy and registering them once (isa.h has the scheme).
//
// A kernel file lists its ops once, as X(op_name, function), in a macro, e.g.
//   #define UNLEARN_SMOOTHING_OPS(X) X("quantize_mc", quantize_mc_cpu) ...
// and ends, at global scope after isa_target_end.h, with the one line UNLEARN_PER_ISA_OPS(list).
// In every copy that exports each function's address as a constant with external linkage,
// unlearn::cpu::<isa>::fn_of_isa. In the scalar copy (the file compiled as itself) it also
// registers the ops, once: it declares the other copies' constants (their types from its own
// functions) and registers, per op, a kernel that calls the copy chosen_isa() names.
#pragma once

#include <torch/library.h>

#include <utility>

#include "isa.h"

namespace unlearn {
namespace cpu {

template <typename Fn>
struct PerIsa;

template <typename R, typename... A>
struct PerIsa<R (*)(A...)> {
  using Fn = R (*)(A...);
  // x86-64: the scalar, AVX2 and AVX-512 copies.
  template <const Fn* Scalar, const Fn* Avx2, const Fn* Avx512>
  static R call_x86(A... a) {
    switch (chosen_isa()) {
      case CpuIsa::avx512: return (*Avx512)(std::forward<A>(a)...);
      case CpuIsa::avx2: return (*Avx2)(std::forward<A>(a)...);
      default: return (*Scalar)(std::forward<A>(a)...);
    }
  }
  // aarch64: the scalar and NEON copies.
  template <const Fn* Scalar, const Fn* Neon>
  static R call_aarch64(A... a) {
    return chosen_isa() == CpuIsa::neon ? (*Neon)(std::forward<A>(a)...) : (*Scalar)(std::forward<A>(a)...);
  }
};

}  // namespace cpu
}  // namespace unlearn

#define UNLEARN_EXPORT_OP(name, fn) \
  extern const decltype(&fn) fn##_of_isa; \
  const decltype(&fn) fn##_of_isa = &fn;
#define UNLEARN_EXPORT_OPS(list) list(UNLEARN_EXPORT_OP)

#define UNLEARN_IMPORT_OP(name, fn) extern const decltype(&::unlearn::cpu::scalar::fn) fn##_of_isa;

// Registration of a list, by the scalar copy only (the AVX2 / AVX-512 / NEON copies define the ISA
// macros before they include the kernel file, hence before this header).
#if defined(UNLEARN_ISA_AVX2) || defined(UNLEARN_ISA_AVX512) || defined(UNLEARN_ISA_NEON)
#define UNLEARN_REGISTER_OPS(list)
#elif UNLEARN_X86_VARIANTS
#define UNLEARN_REGISTER_OP(name, fn)                                                            \
  m.impl(name, &PerIsa<decltype(&scalar::fn)>::call_x86<&scalar::fn##_of_isa, &avx2::fn##_of_isa, \
                                                        &avx512::fn##_of_isa>);
#define UNLEARN_REGISTER_OPS(list)                  \
  namespace avx2 { list(UNLEARN_IMPORT_OP) }        \
  namespace avx512 { list(UNLEARN_IMPORT_OP) }      \
  TORCH_LIBRARY_IMPL(unlearn_ext, CPU, m) { list(UNLEARN_REGISTER_OP) }
#elif UNLEARN_NEON_VARIANT
#define UNLEARN_REGISTER_OP(name, fn) \
  m.impl(name, &PerIsa<decltype(&scalar::fn)>::call_aarch64<&scalar::fn##_of_isa, &neon::fn##_of_isa>);
#define UNLEARN_REGISTER_OPS(list)           \
  namespace neon { list(UNLEARN_IMPORT_OP) } \
  TORCH_LIBRARY_IMPL(unlearn_ext, CPU, m) { list(UNLEARN_REGISTER_OP) }
#else
// Only the scalar copy exists: chosen_isa() can name nothing else.
#define UNLEARN_REGISTER_OP(name, fn) m.impl(name, &scalar::fn);
#define UNLEARN_REGISTER_OPS(list) \
  TORCH_LIBRARY_IMPL(unlearn_ext, CPU, m) { list(UNLEARN_REGISTER_OP) }
#endif

// Everything a kernel file does with its op list: export this copy's functions, and register the
// ops once (scalar copy). The functions live in the file's unlearn::cpu::UNLEARN_ISA namespace (its
// anonymous namespace inside it is visible when the namespace is reopened here).
#define UNLEARN_PER_ISA_OPS(list)                     \
  namespace unlearn {                                 \
  namespace cpu {                                     \
  namespace UNLEARN_ISA { UNLEARN_EXPORT_OPS(list) }  \
  UNLEARN_REGISTER_OPS(list)                          \
  }                                                   \
  }
