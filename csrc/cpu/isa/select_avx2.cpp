// The avx2 copy of ../select_cpu.cpp (the scheme: ../isa.h). Empty where GCC's x86 targets are absent.
#include "../isa.h"
#if UNLEARN_X86_VARIANTS
#define UNLEARN_ISA_AVX2 1
#include "../select_cpu.cpp"
#endif
