// The CPU Lion launch: what the launcher (lion_cpu.cpp, built once) hands to
// the kernel (lion_cpu_kernel.cpp, built once per instruction set).
#pragma once

#include <cstdint>
#include <vector>

#include <c10/core/ScalarType.h>

#include <pyoptim/lion.h>
#include <pyoptim/multi_tensor.h>
#include <pyoptim/precision.h>

#include "cpu_isa.h"

namespace pyoptim::cpu {

// Elements per CPU work item (see kAdamCpuChunk): Lion moves 20 bytes per
// fp32 element, so 16K elements is over 300 KB.
constexpr int64_t kLionCpuChunk = 16384;

struct LionCpuLaunch {
  c10::ScalarType dtype;
  c10::ScalarType state_dtype;   // of m (note [state dtype])
  MasterWeights policy;
  std::vector<void*> extra;      // per tensor: its masters or remainders (nullptr under other policies)
  std::vector<uint32_t> key;     // per tensor: note [stochastic key] (kStochastic)
  double grad_mul;               // inv_grad_scale * (maximize ? -1 : 1) * clip_coef
  std::vector<void*> p, m;       // per tensor
  std::vector<const void*> g;    // per tensor; read only
  std::vector<int64_t> numel;    // per tensor
  std::vector<LionHyper> hyper;  // per tensor (its group's)
  std::vector<double> lr;        // per tensor
  LaunchGroup plan;              // one group holding every tensor
};

// Built once per instruction set (setup.py's ISA_SOURCES); see cpu_isa.h.
PYOPTIM_DECLARE_ISA_KERNELS(void lion_kernel(const LionCpuLaunch& launch))

}  // namespace pyoptim::cpu
