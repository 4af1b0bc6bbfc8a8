// Host-side checks of the optimizer-step ops (adam_step_, sgd_step_, ...),
// shared by their CPU and CUDA launchers. Each check_*_args returns its
// TensorScan, for prepare_work (note [one pass] in multi_tensor_host.cpp).
#pragma once

#include <optional>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include "multi_tensor_host.h"

namespace pyoptim {

// The arguments every step op takes after its tensor lists: GradScaler's
// scale and found-inf flag, an lr per group on the device, and the fused
// clip (the grads' total L2 norm and the max norm).
struct StepAux {
  const std::optional<at::Tensor>& lr_tensor;
  const std::optional<at::Tensor>& grad_scale;
  const std::optional<at::Tensor>& found_inf;
  const std::optional<at::Tensor>& grad_norm;
  double max_grad_norm;
};

// Checks StepAux against params' device and the number of groups.
void check_step_aux(const char* op, const StepAux& aux, at::TensorList params, int64_t groups);

// The step's grad multiplier on the CPU (see clip.h); reads CPU tensors.
double cpu_grad_multiplier(const StepAux& aux, bool maximize);

// True when found_inf (a CPU tensor) says to skip the step.
bool cpu_found_inf(const StepAux& aux);

// One lr per group: lr_tensor's values when given (a CPU tensor here), else lr.
std::vector<double> cpu_group_lrs(const StepAux& aux, c10::ArrayRef<double> lr);

// l1_weight_decay: one value per group, or empty (none); each >= 0.
void check_l1_weight_decay(const char* op, c10::ArrayRef<double> l1_weight_decay, int64_t groups);

// Advances a float32 step counter on the CPU by one and returns its new value.
double cpu_advance_step(const at::Tensor& step);

// Group k's l1_weight_decay (0 when the list is empty).
inline double group_l1(c10::ArrayRef<double> l1_weight_decay, int64_t k) {
  return l1_weight_decay.empty() ? 0.0 : l1_weight_decay[k];
}

// A step op's precision policy (csrc/include/pyoptim/precision.h): at most one given.
struct PrecisionArgs {
  const std::optional<at::TensorList>& master_params;
  const std::optional<at::TensorList>& param_remainders;
  const std::optional<int64_t>& stochastic_seed;

  // The masters or remainders list (empty under the other policies).
  at::TensorList extra() const {
    return master_params ? *master_params : param_remainders ? *param_remainders : at::TensorList();
  }
  // The policy, as precision.h's MasterWeights (check_precision has checked there is at most one).
  int32_t policy() const { return master_params ? 1 : param_remainders ? 2 : stochastic_seed ? 3 : 0; }
};

struct AdamArgs {
  at::TensorList params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps;
  c10::ArrayRef<double> lr, beta1, beta2, weight_decay, eps, l1_weight_decay;
  c10::IntArrayRef group_sizes;
  bool amsgrad, maximize, decoupled_weight_decay;
  StepAux aux;
  PrecisionArgs precision;
};

TensorScan check_adam_args(const AdamArgs& a, c10::DeviceType device_type);

struct SgdArgs {
  at::TensorList params, grads, momentum_buffers;
  c10::ArrayRef<double> lr, momentum, dampening, weight_decay, l1_weight_decay;
  c10::IntArrayRef group_sizes;
  bool nesterov, maximize, is_first_step;
  StepAux aux;
  PrecisionArgs precision;
  const std::optional<at::TensorList>& state_steps;  // stochastic rounding's step counters (SGD keeps none else)
};

TensorScan check_sgd_args(const SgdArgs& a, c10::DeviceType device_type);

struct LionArgs {
  at::TensorList params, grads, exp_avgs;
  c10::ArrayRef<double> lr, beta1, beta2, weight_decay, l1_weight_decay;
  c10::IntArrayRef group_sizes;
  bool maximize;
  StepAux aux;
  PrecisionArgs precision;
  const std::optional<at::TensorList>& state_steps;  // stochastic rounding's step counters (Lion keeps none else)
};

TensorScan check_lion_args(const LionArgs& a, c10::DeviceType device_type);

struct LambArgs {
  at::TensorList params, grads, exp_avgs, exp_avg_sqs, state_steps;
  c10::ArrayRef<double> lr, beta1, beta2, weight_decay, eps, l1_weight_decay;
  c10::IntArrayRef group_sizes;
  bool maximize;
  StepAux aux;
  PrecisionArgs precision;
};

// op: "lamb_step_", "lamb_moments_" or "lamb_apply_" (they take the same arguments), for the messages.
TensorScan check_lamb_args(const LambArgs& a, c10::DeviceType device_type, const char* op = "lamb_step_");
// lamb_apply_'s norms: float64 [2, n] on the params' device (the [||p||^2, ||u||^2] rows lamb_moments_ returns).
void check_lamb_norms(const char* op, const at::Tensor& norms, at::TensorList params);

struct AdagradArgs {
  at::TensorList params, grads, state_sums, state_steps;
  c10::ArrayRef<double> lr, lr_decay, weight_decay, eps, l1_weight_decay;
  c10::IntArrayRef group_sizes;
  bool maximize;
  StepAux aux;
  PrecisionArgs precision;
};

TensorScan check_adagrad_args(const AdagradArgs& a, c10::DeviceType device_type);

struct RmspropArgs {
  at::TensorList params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps;
  c10::ArrayRef<double> lr, alpha, eps, weight_decay, momentum, l1_weight_decay;
  c10::IntArrayRef group_sizes;
  bool centered, maximize;
  StepAux aux;
  PrecisionArgs precision;
};

TensorScan check_rmsprop_args(const RmspropArgs& a, c10::DeviceType device_type);

}  // namespace pyoptim
