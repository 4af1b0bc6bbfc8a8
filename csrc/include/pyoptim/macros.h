// Macros shared by host-only C++, CPU kernels and CUDA kernels.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define PYOPTIM_HOST_DEVICE __host__ __device__
#define PYOPTIM_INLINE __forceinline__
#else
#define PYOPTIM_HOST_DEVICE
#define PYOPTIM_INLINE inline __attribute__((always_inline))
#endif

// note [ISA namespaces]: the CPU kernel files are built once per instruction
// set (setup.py's ISAS), and they include these headers. Inline functions
// and templates of those builds must not share mangled names, or the linker
// keeps one build's copy for all of them (AVX-512 code on a CPU without it).
// So headers put code (not plain data types) in `inline namespace
// PYOPTIM_ISA`: CPU_CAPABILITY in those builds, `portable` everywhere else.
#if defined(CPU_CAPABILITY)
#define PYOPTIM_ISA CPU_CAPABILITY
#else
#define PYOPTIM_ISA portable
#endif
