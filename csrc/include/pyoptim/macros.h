// Macros shared by host-only C++, CPU kernels and CUDA kernels.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define PYOPTIM_HOST_DEVICE __host__ __device__
#define PYOPTIM_INLINE __forceinline__
#else
#define PYOPTIM_HOST_DEVICE
#define PYOPTIM_INLINE inline __attribute__((always_inline))
#endif
