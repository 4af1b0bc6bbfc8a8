// The CPU Adam launch: what the launcher (adam_cpu.cpp, built once) hands to
// the kernel (adam_cpu_kernel.cpp, built once per instruction set).
#pragma once

#include <cstdint>
#include <vector>

#include <c10/core/ScalarType.h>

#include <pyoptim/adam.h>
#include <pyoptim/multi_tensor.h>
#include <pyoptim/precision.h>

#include "cpu_isa.h"

namespace pyoptim::cpu {

// Elements per CPU work item: 16K elements is 448 KB of traffic for an fp32
// step, enough to amortize a task's start, small enough to balance 2,000
// tensors of 8K over the threads. A multiple of every vector width.
constexpr int64_t kAdamCpuChunk = 16384;

struct AdamCpuLaunch {
  c10::ScalarType dtype;
  c10::ScalarType state_dtype;        // of m, v, vm (note [state dtype])
  MasterWeights policy;
  std::vector<void*> extra;           // per tensor: its masters or remainders (nullptr under other policies)
  std::vector<uint32_t> key;          // per tensor: note [stochastic key] (kStochastic)
  bool amsgrad;
  bool decoupled;
  double grad_mul;                    // inv_grad_scale * (maximize ? -1 : 1)
  std::vector<void*> p, m, v, vm;     // per tensor; vm empty without amsgrad
  std::vector<const void*> g;         // per tensor; read only
  std::vector<int64_t> numel;         // per tensor
  std::vector<AdamHyper> hyper;       // per tensor (its group's)
  std::vector<double> lr;             // per tensor
  std::vector<double> step;           // per tensor, already advanced
  LaunchGroup plan;                   // one group holding every tensor
};

// Built once per instruction set (setup.py's ISA_SOURCES); see cpu_isa.h.
PYOPTIM_DECLARE_ISA_KERNELS(void adam_kernel(const AdamCpuLaunch& launch))

}  // namespace pyoptim::cpu
