#include "cpu_isa.h"

#include <cstdlib>
#include <string>

namespace pyoptim::cpu {

namespace {

Isa detect_isa() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  Isa isa = Isa::DEFAULT;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    isa = Isa::AVX2;
  }
  if (isa == Isa::AVX2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    isa = Isa::AVX512;
  }
  if (const char* env = std::getenv("ATEN_CPU_CAPABILITY")) {
    const std::string want(env);
    if (want == "default") {
      isa = Isa::DEFAULT;
    } else if (want == "avx2" && isa == Isa::AVX512) {
      isa = Isa::AVX2;
    }
  }
  return isa;
#else
  return Isa::DEFAULT;
#endif
}

}  // namespace

Isa cpu_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

const char* cpu_isa_name() {
  switch (cpu_isa()) {
    case Isa::AVX512: return "AVX512";
    case Isa::AVX2: return "AVX2";
    default: return "DEFAULT";
  }
}

}  // namespace pyoptim::cpu
