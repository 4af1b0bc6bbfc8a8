// The CPU launches of multi_tensor_norm and clip_scale_: what the launcher
// (clip_cpu.cpp, built once) hands to the kernels (clip_cpu_kernel.cpp,
// built once per instruction set).
#pragma once

#include <cstdint>
#include <vector>

#include <c10/core/ScalarType.h>

#include <pyoptim/multi_tensor.h>
#include <pyoptim/vector_norm.h>

#include "cpu_isa.h"

namespace pyoptim::cpu {

// Elements per work item; a norm reads 4 bytes per fp32 element, so 64K
// elements (256 KB) keep a task's start small against its work.
constexpr int64_t kNormCpuChunk = 65536;

struct MultiTensorCpuLaunch {
  c10::ScalarType dtype;
  std::vector<void*> ptr;  // per tensor
  std::vector<int64_t> numel;
  LaunchGroup plan;  // one group holding every tensor
};

// partial[c] = the accumulation (norm_term summed, or maxed) of chunk c.
PYOPTIM_DECLARE_ISA_KERNELS(void norm_kernel(const MultiTensorCpuLaunch& launch, NormKind kind, double p,
                                             double* partial))
// Every tensor *= coef.
PYOPTIM_DECLARE_ISA_KERNELS(void scale_kernel(const MultiTensorCpuLaunch& launch, float coef))

}  // namespace pyoptim::cpu
