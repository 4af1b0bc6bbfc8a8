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

#if defined(__x86_64__)
#define PYOPTIM_DECLARE_ISA_KERNELS(decl) \
  namespace DEFAULT {                     \
  decl;                                   \
  }                                       \
  namespace AVX2 {                        \
  decl;                                   \
  }                                       \
  namespace AVX512 {                      \
  decl;                                   \
  }
#define PYOPTIM_ISA_DISPATCH(fn, ...)                                     \
  switch (::pyoptim::cpu::cpu_isa()) {                                    \
    case ::pyoptim::cpu::Isa::AVX512: return AVX512::fn(__VA_ARGS__);     \
    case ::pyoptim::cpu::Isa::AVX2: return AVX2::fn(__VA_ARGS__);         \
    default: return DEFAULT::fn(__VA_ARGS__);                             \
  }
#else
#define PYOPTIM_DECLARE_ISA_KERNELS(decl) \
  namespace DEFAULT {                     \
  decl;                                   \
  }
#define PYOPTIM_ISA_DISPATCH(fn, ...) return DEFAULT::fn(__VA_ARGS__);
#endif
