// Which instruction set the CPU kernels run with here. The kernel files in
// setup.py's ISA_SOURCES are built once per instruction set, each into
// namespace pyoptim::cpu::<ISA>; a launcher calls the one cpu_isa() names
// through PYOPTIM_CPU_DISPATCH.
#pragma once

namespace pyoptim::cpu {

enum class Isa { DEFAULT = 0, AVX2 = 1, AVX512 = 2 };

// The widest instruction set both this CPU and ATEN_CPU_CAPABILITY (torch's
// own override, honoured the same way) allow; detected once.
Isa cpu_isa();

const char* cpu_isa_name();

}  // namespace pyoptim::cpu

// `return <ISA>::FN(args...)` for the instruction set cpu_isa() names.
#if defined(__x86_64__)
#define PYOPTIM_CPU_DISPATCH(FN, ...)                                              \
  switch (::pyoptim::cpu::cpu_isa()) {                                             \
    case ::pyoptim::cpu::Isa::AVX512: return ::pyoptim::cpu::AVX512::FN(__VA_ARGS__); \
    case ::pyoptim::cpu::Isa::AVX2: return ::pyoptim::cpu::AVX2::FN(__VA_ARGS__);     \
    default: return ::pyoptim::cpu::DEFAULT::FN(__VA_ARGS__);                     \
  }
#else
#define PYOPTIM_CPU_DISPATCH(FN, ...) return ::pyoptim::cpu::DEFAULT::FN(__VA_ARGS__);
#endif
