// The `_C` Python module: build and CPU-feature information, and the registration of the ops'
// autograd kernels (ops.cpp). Tensor ops go through the
// dispatcher registry (ops.cpp), never through pybind11, so torch.compile and opcheck see them.
#include <torch/extension.h>

#include <string>

#include "cpu/mc_kernel.h"

namespace unlearn {
int64_t register_autograd_kernels();  // ops.cpp
}

namespace {

bool built_with_cuda() {
#ifdef UNLEARN_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::string cpu_flags() {
#ifdef UNLEARN_CPU_FLAGS
  return UNLEARN_CPU_FLAGS;
#else
  return "";
#endif
}

std::string cpu_vector_isa() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__)
  return "avx2";
#elif defined(__SSE2__)
  return "sse2";
#else
  return "scalar";
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "unlearn_ext compiled kernels (ops are registered under torch.ops.unlearn_ext)";
  m.def("register_autograd_kernels", &unlearn::register_autograd_kernels,
        "Registers the Autograd and ADInplaceOrView kernels of every defined unlearn_ext op (once)");
  m.def("built_with_cuda", &built_with_cuda, "True if the CUDA kernels were compiled in");
  m.def("cpu_flags", &cpu_flags, "Extra compiler flags the CPU kernels were built with");
  m.def("cpu_vector_isa", &cpu_vector_isa, "Widest x86 vector ISA the CPU kernels were compiled for");
  m.def("mc_kernel_path", [] { return std::string(unlearn::cpu::mc_kernel_path()); },
        "Path the CPU `mc` kernel takes now: avx512 (chosen at run time, whatever the build flags) or "
        "scalar (no AVX-512, or UNLEARN_EXT_MC_KERNEL=scalar)");
}
