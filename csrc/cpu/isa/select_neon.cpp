// The neon copy of ../select_cpu.cpp (the scheme: ../isa.h). Empty where aarch64's NEON is absent.
#include "../isa.h"
#if UNLEARN_NEON_VARIANT
#define UNLEARN_ISA_NEON 1
#include "../select_cpu.cpp"
#endif
