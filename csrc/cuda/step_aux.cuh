// The device side of StepAux (csrc/optim_host.h): what every step kernel
// reads on the device instead of asking the host, so a step never syncs and
// can be captured in a CUDA graph.
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>

#include <pyoptim/clip.h>
#include <pyoptim/precision.h>

#include "../optim_host.h"

namespace pyoptim::cuda {

// Param groups per launch: their hyperparameters travel in the metadata.
constexpr int kMaxGroups = 32;

struct StepDeviceAux {
  const double* lr_tensor;  // [groups] or null
  const float* grad_scale;  // [1] or null
  const float* found_inf;   // [1] or null
  const float* grad_norm;   // [1] or null: clip by max_grad_norm
  float max_grad_norm;
  bool maximize;

  static StepDeviceAux from(const StepAux& aux, bool maximize) {
    auto ptr = [](const std::optional<at::Tensor>& t) { return t.has_value() ? t->const_data_ptr() : nullptr; };
    return {static_cast<const double*>(ptr(aux.lr_tensor)), static_cast<const float*>(ptr(aux.grad_scale)),
            static_cast<const float*>(ptr(aux.found_inf)), static_cast<const float*>(ptr(aux.grad_norm)),
            static_cast<float>(aux.max_grad_norm), maximize};
  }

  // found_inf is set: the step changes nothing.
  __device__ __forceinline__ bool skip() const { return found_inf != nullptr && *found_inf != 0.0f; }

  // The lr of group `local` of a launch whose groups start at `group_base`.
  __device__ __forceinline__ double lr(int group_base, int local, double lr_value) const {
    return lr_tensor != nullptr ? lr_tensor[group_base + local] : lr_value;
  }

  __device__ __forceinline__ double grad_mul() const {
    return grad_multiplier(grad_scale, grad_norm, max_grad_norm, maximize);
  }
};

// Advances every step of a launch (list STEP of its metadata: float32
// scalars) unless found_inf is set. Runs before the update kernel, which
// reads the advanced value (as torch's fused Adam does).
template <int STEP, typename Meta>
__global__ void step_count_kernel(const __grid_constant__ Meta meta, StepDeviceAux aux) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= meta.num_tensors || aux.skip()) {
    return;
  }
  *static_cast<float*>(meta.ptr[STEP][i]) += 1.0f;
}

// The stochastic key (note [stochastic key]) of the tensor in `slot` of a mixed-precision call whose list
// STEP holds each tensor's step counter (float32, already advanced); 0 under the other policies, where the
// counter is not read (that list may then be empty). Every mixed functor's meta has extra.policy and
// extra.seed.
template <int STEP, typename Meta>
__device__ __forceinline__ uint32_t slot_key(const Meta& meta, int slot) {
  return meta.extra.policy == MasterWeights::kStochastic
             ? stochastic_key(meta.extra.seed, *static_cast<const float*>(meta.ptr[STEP][slot]),
                              meta.first_tensor + slot)
             : 0u;
}

}  // namespace pyoptim::cuda
