// The avx512 copy of ../codecs_cpu.cpp (the scheme: ../isa.h). Empty where GCC's x86 targets are absent.
#include "../isa.h"
#if UNLEARN_X86_VARIANTS
#define UNLEARN_ISA_AVX512 1
#include "../codecs_cpu.cpp"
#endif
