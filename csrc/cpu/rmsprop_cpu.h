// The CPU RMSprop launch: what the launcher (rmsprop_cpu.cpp, built once)
// hands to the kernel (rmsprop_cpu_kernel.cpp, built once per instruction set).
#pragma once

#include <cstdint>
#include <vector>

#include <c10/core/ScalarType.h>

#include <pyoptim/multi_tensor.h>
#include <pyoptim/precision.h>
#include <pyoptim/rmsprop.h>

#include "cpu_isa.h"

namespace pyoptim::cpu {

// Elements per CPU work item (see kAdamCpuChunk): RMSprop moves 20 to 36
// bytes per fp32 element, so 16K elements is 300 to 600 KB.
constexpr int64_t kRmspropCpuChunk = 16384;

struct RmspropCpuLaunch {
  c10::ScalarType dtype;
  c10::ScalarType state_dtype;        // of sa, ga, buf (note [state dtype])
  MasterWeights policy;
  std::vector<void*> extra;           // per tensor: its masters or remainders (nullptr under other policies)
  std::vector<uint32_t> key;          // per tensor: note [stochastic key] (kStochastic)
  bool centered;                      // ga given
  bool momentum;                      // buf given
  double grad_mul;                    // inv_grad_scale * (maximize ? -1 : 1) * clip_coef
  std::vector<void*> p, sa, ga, buf;  // per tensor; ga empty unless centered, buf unless momentum
  std::vector<const void*> g;         // per tensor; read only
  std::vector<int64_t> numel;         // per tensor
  std::vector<RmspropHyper> hyper;    // per tensor (its group's)
  std::vector<double> lr;             // per tensor
  LaunchGroup plan;                   // one group holding every tensor
};

// Built once per instruction set (setup.py's ISA_SOURCES); see cpu_isa.h.
PYOPTIM_DECLARE_ISA_KERNELS(void rmsprop_kernel(const RmspropCpuLaunch& launch))

}  // namespace pyoptim::cpu
