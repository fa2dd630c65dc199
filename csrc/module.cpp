// The `_C` Python module: build and CPU-feature information only. Tensor ops go through the
// dispatcher registry (ops.cpp), never through pybind11, so torch.compile and opcheck see them.
#include <torch/extension.h>

#include <string>
#include <vector>

#include "cpu/isa.h"

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

std::vector<std::string> cpu_isas() {
  std::vector<std::string> names;
  for (unlearn::cpu::CpuIsa isa : unlearn::cpu::supported_isas()) names.emplace_back(unlearn::cpu::isa_name(isa));
  return names;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "unlearn_ext compiled kernels (ops are registered under torch.ops.unlearn_ext)";
  m.def("built_with_cuda", &built_with_cuda, "True if the CUDA kernels were compiled in");
  m.def("cpu_flags", &cpu_flags, "Extra compiler flags the CPU kernels were built with");
  m.def("cpu_isas", &cpu_isas, "Vector paths of the CPU kernels that this CPU and build can run, narrowest first");
  m.def("cpu_isa", [] { return std::string(unlearn::cpu::isa_name(unlearn::cpu::chosen_isa())); },
        "Path the CPU kernels take now: the widest of cpu_isas(), or the one UNLEARN_EXT_CPU_ISA names");
}
