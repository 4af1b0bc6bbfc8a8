// The CPU launches of multi_tensor_norm and clip_scale_: what the launcher
// (clip_cpu.cpp, built once) hands to the kernels (clip_cpu_kernel.cpp,
// built once per instruction set).
#pragma once

#include <cstdint>
#include <vector>

#include <c10/util/irange.h>

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

// Each tensor's accumulation of `plan`: norm_combine<K> of its chunks'
// partials partial[c * stride], in chunk order (deterministic). The norm's
// reduction, shared with the ops that reduce per-tensor norms in a pass of
// their own (LAMB's trust ratio).
inline namespace PYOPTIM_ISA {  // note [ISA namespaces]

template <NormKind K>
std::vector<double> combine_chunks(const LaunchGroup& plan, const double* partial, int64_t stride = 1) {
  std::vector<double> acc(plan.num_tensors, 0.0);
  for (const auto s : c10::irange(plan.num_tensors)) {
    for (int64_t c = plan.chunk_prefix[s]; c < plan.chunk_prefix[s + 1]; ++c) {
      acc[s] = norm_combine<K>(acc[s], partial[c * stride]);
    }
  }
  return acc;
}

}  // namespace PYOPTIM_ISA

// partial[c] = the accumulation (norm_term summed, or maxed) of chunk c.
PYOPTIM_DECLARE_ISA_KERNELS(void norm_kernel(const MultiTensorCpuLaunch& launch, NormKind kind, double p,
                                             double* partial))
// Every tensor *= coef.
PYOPTIM_DECLARE_ISA_KERNELS(void scale_kernel(const MultiTensorCpuLaunch& launch, float coef))

}  // namespace pyoptim::cpu
