"""Build of unlearn_ext._C: CPU kernels always, CUDA kernels when torch and nvcc allow it.

Switches (environment variables):
  UNLEARN_EXT_CUDA=auto|0|1   auto (default): build CUDA sources if torch is a CUDA build and nvcc
                              is found; 0: CPU only (fast iteration); 1: require CUDA, fail if absent.
  UNLEARN_EXT_NO_EXTENSION=1  build nothing: the package then runs on its pure-PyTorch reference.
Build with `pip install --no-build-isolation -e .` so the extension compiles against the torch that
will import it (build isolation would fetch a second torch).
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_wanted():
    mode = os.environ.get("UNLEARN_EXT_CUDA", "auto").lower()
    if mode in ("0", "false", "no", "off"):
        return False
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    available = torch.version.cuda is not None and CUDA_HOME is not None and (
        shutil.which("nvcc") is not None or os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    )
    if mode in ("1", "true", "yes", "on") and not available:
        raise RuntimeError(
            "UNLEARN_EXT_CUDA=1 but CUDA cannot be built: torch.version.cuda="
            f"{torch.version.cuda}, CUDA_HOME={CUDA_HOME}. Install a CUDA build of torch and set "
            "CUDA_HOME (e.g. /usr/local/cuda)."
        )
    return available


def _extensions():
    if os.environ.get("UNLEARN_EXT_NO_EXTENSION") == "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    # Portable: no -march, so the build runs on any CPU of its architecture. The hot kernels are also
    # compiled for AVX2 and AVX-512 (csrc/cpu/isa/, enabled per function) and each call picks the
    # widest path the CPU has (csrc/cpu/isa.h).
    # -fno-math-errno / -fno-trapping-math let GCC vectorize the Phi and Philox loops (DESIGN 9).
    # -ffp-contract=off: the wider copies may use FMA; no a*b+c may be fused into one rounding, so
    # every path rounds like the reference (GCC's ISO C++ default, stated so no flag changes it).
    # -fopenmp: at::parallel_for is inline and uses OpenMP pragmas; without the flag it runs serial.
    cpu_flags = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-fopenmp"]
    sources = (["csrc/ops.cpp", "csrc/module.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
               + sorted(glob.glob("csrc/cpu/isa/*.cpp")))
    macros = [("UNLEARN_CPU_FLAGS", '"' + " ".join(cpu_flags) + '"')]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    if _cuda_wanted():
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        ext = CUDAExtension(
            "unlearn_ext._C",
            sources,
            include_dirs=include_dirs,
            define_macros=macros + [("UNLEARN_WITH_CUDA", None)],
            extra_compile_args={"cxx": cpu_flags, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "unlearn_ext._C",
            sources,
            include_dirs=include_dirs,
            define_macros=macros,
            extra_compile_args={"cxx": cpu_flags},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["unlearn_ext", "unlearn_ext.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
