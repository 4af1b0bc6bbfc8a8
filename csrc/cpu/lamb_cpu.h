// The CPU LAMB launch: what the launcher (lamb_cpu.cpp, built once) hands to
// the kernels (lamb_cpu_kernel.cpp, built once per instruction set).
#pragma once

#include <cstdint>
#include <vector>

#include <c10/core/ScalarType.h>

#include <pyoptim/lamb.h>
#include <pyoptim/multi_tensor.h>
#include <pyoptim/precision.h>

#include "cpu_isa.h"

namespace pyoptim::cpu {

// Elements per CPU work item (see kAdamCpuChunk); also the unit of the
// norms' partial sums, so a tensor's norms do not depend on the threads.
constexpr int64_t kLambCpuChunk = 16384;

struct LambCpuLaunch {
  c10::ScalarType dtype;
  c10::ScalarType state_dtype;     // of m and v (note [state dtype])
  MasterWeights policy;
  std::vector<void*> extra;        // per tensor: its masters or remainders (nullptr under other policies)
  std::vector<uint32_t> key;       // per tensor: note [stochastic key] (kStochastic)
  double grad_mul;                 // inv_grad_scale * (maximize ? -1 : 1) * clip_coef
  std::vector<void*> p, m, v;      // per tensor
  std::vector<const void*> g;      // per tensor; read only
  std::vector<int64_t> numel;      // per tensor
  std::vector<LambHyper> hyper;    // per tensor (its group's)
  std::vector<double> lr;          // per tensor
  std::vector<double> step;        // per tensor, already advanced
  LaunchGroup plan;                // one group holding every tensor
};

// First pass: m, v updated; partial[2 c] and partial[2 c + 1] = the sums of
// p * p and u * u over chunk c of the plan.
PYOPTIM_DECLARE_ISA_KERNELS(void lamb_moments_kernel(const LambCpuLaunch& launch, double* partial))
// Second pass: p -= lr * ratio[i] * u for every tensor i.
PYOPTIM_DECLARE_ISA_KERNELS(void lamb_apply_kernel(const LambCpuLaunch& launch, const double* ratio))

}  // namespace pyoptim::cpu
