// Portable qualifiers so one function body compiles for host (g++) and device (nvcc).
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define UE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define UE_HOST_DEVICE inline __attribute__((always_inline))
#endif
