// Gradient clipping by the global norm, as torch.nn.utils.clip_grad_norm_
// computes its factor (float32 tensor arithmetic there, float here; its
// `max_norm / tensor` is reciprocal(tensor) * max_norm):
//   coef = min(max_norm / (total_norm + 1e-6), 1)
// NaN stays NaN (torch.clamp propagates it): the grads then become NaN too.
#pragma once

#include <pyoptim/macros.h>

namespace pyoptim {
inline namespace PYOPTIM_ISA {  // note [ISA namespaces]

PYOPTIM_HOST_DEVICE inline float clip_coef(float total_norm, float max_norm) {
  const float coef = (1.0f / (total_norm + 1e-6f)) * max_norm;
  return (coef < 1.0f || coef != coef) ? coef : 1.0f;
}

// What the step kernels multiply each grad by: GradScaler's inverse scale,
// maximize's sign and the clip factor of the unscaled grads' norm
// (`grad_norm` is the norm of the grads as passed, i.e. scaled).
PYOPTIM_HOST_DEVICE inline double grad_multiplier(const float* grad_scale, const float* grad_norm, float max_grad_norm,
                                                 bool maximize) {
  // GradScaler's own inverse: 1 / scale in double, rounded to float.
  const float inv_scale = grad_scale != nullptr ? static_cast<float>(1.0 / static_cast<double>(*grad_scale)) : 1.0f;
  double mul = inv_scale;
  if (grad_norm != nullptr) {
    mul *= static_cast<double>(clip_coef(*grad_norm * inv_scale, max_grad_norm));
  }
  return maximize ? -mul : mul;
}

}  // namespace PYOPTIM_ISA
}  // namespace pyoptim
