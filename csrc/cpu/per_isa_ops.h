// Exporting a kernel file's ops from each ISA copy and registering them once (isa.h has the scheme).
//
// A kernel file lists its ops once, as X(op_name, function), in a macro, e.g.
//   #define UNLEARN_SMOOTHING_OPS(X) X("quantize_mc", quantize_mc_cpu) ...
// Inside its copy's namespace (unlearn::cpu::UNLEARN_ISA) it writes UNLEARN_EXPORT_OPS(list): each
// function's address in a constant with external linkage, fn_of_isa. The scalar copy then writes
// UNLEARN_REGISTER_OPS(list) once at namespace unlearn::cpu scope: it declares the other copies'
// constants (their types from its own functions) and registers, per op, a kernel that calls the
// copy chosen_isa() names.
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
  template <const Fn* Scalar, const Fn* Avx2, const Fn* Avx512>
  static R call(A... a) {
    switch (chosen_isa()) {
      case CpuIsa::avx512: return (*Avx512)(std::forward<A>(a)...);
      case CpuIsa::avx2: return (*Avx2)(std::forward<A>(a)...);
      default: return (*Scalar)(std::forward<A>(a)...);
    }
  }
};

}  // namespace cpu
}  // namespace unlearn

#define UNLEARN_EXPORT_OP(name, fn) \
  extern const decltype(&fn) fn##_of_isa; \
  const decltype(&fn) fn##_of_isa = &fn;
#define UNLEARN_EXPORT_OPS(list) list(UNLEARN_EXPORT_OP)

#define UNLEARN_IMPORT_OP(name, fn) extern const decltype(&::unlearn::cpu::scalar::fn) fn##_of_isa;

#if UNLEARN_X86_VARIANTS
#define UNLEARN_REGISTER_OP(name, fn)                                                        \
  m.impl(name, &PerIsa<decltype(&scalar::fn)>::call<&scalar::fn##_of_isa, &avx2::fn##_of_isa, \
                                                    &avx512::fn##_of_isa>);
#define UNLEARN_REGISTER_OPS(list)                  \
  namespace avx2 { list(UNLEARN_IMPORT_OP) }        \
  namespace avx512 { list(UNLEARN_IMPORT_OP) }      \
  TORCH_LIBRARY_IMPL(unlearn_ext, CPU, m) { list(UNLEARN_REGISTER_OP) }
#else
// Only the scalar copy exists: chosen_isa() can name nothing else.
#define UNLEARN_REGISTER_OP(name, fn) m.impl(name, &scalar::fn);
#define UNLEARN_REGISTER_OPS(list) \
  TORCH_LIBRARY_IMPL(unlearn_ext, CPU, m) { list(UNLEARN_REGISTER_OP) }
#endif
