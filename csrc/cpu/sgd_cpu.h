// The CPU SGD launch: what the launcher (sgd_cpu.cpp, built once) hands to
// the kernel (sgd_cpu_kernel.cpp, built once per instruction set).
#pragma once

#include <cstdint>
#include <vector>

#include <c10/core/ScalarType.h>

#include <pyoptim/multi_tensor.h>
#include <pyoptim/precision.h>
#include <pyoptim/sgd.h>

#include "cpu_isa.h"

namespace pyoptim::cpu {

// Elements per CPU work item (see kAdamCpuChunk): SGD with momentum moves
// 20 bytes per fp32 element, so 16K elements is still over 300 KB.
constexpr int64_t kSgdCpuChunk = 16384;

struct SgdCpuLaunch {
  c10::ScalarType dtype;
  c10::ScalarType state_dtype;  // of buf (note [state dtype])
  MasterWeights policy;
  std::vector<void*> extra;     // per tensor: its masters or remainders (nullptr under other policies)
  std::vector<uint32_t> key;    // per tensor: note [stochastic key] (kStochastic)
  bool momentum;  // momentum buffers given
  bool nesterov;
  bool first_step;
  double grad_mul;
  std::vector<void*> p, buf;  // per tensor; buf empty without momentum
  std::vector<const void*> g;
  std::vector<int64_t> numel;
  std::vector<SgdHyper> hyper;  // per tensor (its group's)
  std::vector<double> lr;       // per tensor
  LaunchGroup plan;
};

// Built once per instruction set (setup.py's ISA_SOURCES); see cpu_isa.h.
PYOPTIM_DECLARE_ISA_KERNELS(void sgd_kernel(const SgdCpuLaunch& launch))

}  // namespace pyoptim::cpu
