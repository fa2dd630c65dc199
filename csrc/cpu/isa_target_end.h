// Ends the ISA region opened by isa_target.h.
#if defined(UNLEARN_ISA_AVX512) || defined(UNLEARN_ISA_AVX2)
#pragma GCC pop_options
#endif
