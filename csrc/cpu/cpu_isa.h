// Run-time choice among the CPU kernels built once per instruction set.
//
// A kernel file listed in setup.py's ISA_SOURCES is built three times, with
// CPU_CAPABILITY = DEFAULT, AVX2 and AVX512, its functions landing in
// pyoptim::cpu::<ISA>. A launcher declares them with
// PYOPTIM_DECLARE_ISA_KERNELS and calls the one this CPU runs with
// PYOPTIM_ISA_DISPATCH.
#pragma once

namespace pyoptim::cpu {

enum class Isa { DEFAULT = 0, AVX2 = 1, AVX512 = 2 };

// The widest instruction set this CPU and ATEN_CPU_CAPABILITY (torch's own
// override, honoured the same way) allow; detected once.
Isa cpu_isa();
const char* cpu_isa_name();

}  // namespace pyoptim::cpu

// setup.py defines PYOPTIM_HAVE_<ISA> for each instruction set it built.
#if defined(PYOPTIM_HAVE_AVX2)
#define PYOPTIM_IF_AVX2(x) x
#else
#define PYOPTIM_IF_AVX2(x)
#endif
#if defined(PYOPTIM_HAVE_AVX512)
#define PYOPTIM_IF_AVX512(x) x
#else
#define PYOPTIM_IF_AVX512(x)
#endif

#define PYOPTIM_DECLARE_ISA_KERNELS(decl)      \
  namespace DEFAULT {                          \
  decl;                                        \
  }                                            \
  PYOPTIM_IF_AVX2(namespace AVX2 { decl; })    \
  PYOPTIM_IF_AVX512(namespace AVX512 { decl; })
#define PYOPTIM_ISA_DISPATCH(fn, ...)                                                 \
  switch (::pyoptim::cpu::cpu_isa()) {                                                \
    PYOPTIM_IF_AVX512(case ::pyoptim::cpu::Isa::AVX512 : return AVX512::fn(__VA_ARGS__);) \
    PYOPTIM_IF_AVX2(case ::pyoptim::cpu::Isa::AVX2 : return AVX2::fn(__VA_ARGS__);)       \
    default: return DEFAULT::fn(__VA_ARGS__);                                         \
  }
