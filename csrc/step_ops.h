// The C++ signature of each optimizer-step op, as its CPU and CUDA kernels
// are registered (the schemas are in ops.cpp). The step plan calls these
// kernels unboxed with them (note [unboxed replay] in step_plan.cpp); every
// launcher static_asserts that it has its op's type, and the dispatcher
// checks the type again when the plan asks for the typed handle.
#pragma once

#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

namespace pyoptim::step_ops {

using Adam = void(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                  at::TensorList max_exp_avg_sqs, at::TensorList state_steps, at::ArrayRef<double> lr,
                  at::ArrayRef<double> beta1, at::ArrayRef<double> beta2, at::ArrayRef<double> weight_decay,
                  at::ArrayRef<double> eps, at::ArrayRef<double> l1_weight_decay, at::IntArrayRef group_sizes,
                  bool amsgrad, bool maximize, bool decoupled_weight_decay,
                  const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
                  const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& grad_norm,
                  double max_grad_norm, std::optional<at::TensorList> master_params,
                  std::optional<at::TensorList> param_remainders, std::optional<int64_t> stochastic_seed);

using Sgd = void(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                 at::ArrayRef<double> lr, at::ArrayRef<double> momentum, at::ArrayRef<double> dampening,
                 at::ArrayRef<double> weight_decay, at::ArrayRef<double> l1_weight_decay, at::IntArrayRef group_sizes,
                 bool nesterov, bool maximize, bool is_first_step, const std::optional<at::Tensor>& lr_tensor,
                 const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                 const std::optional<at::Tensor>& grad_norm, double max_grad_norm,
                 std::optional<at::TensorList> master_params, std::optional<at::TensorList> param_remainders,
                 std::optional<int64_t> stochastic_seed, std::optional<at::TensorList> state_steps);

using Lion = void(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::ArrayRef<double> lr,
                  at::ArrayRef<double> beta1, at::ArrayRef<double> beta2, at::ArrayRef<double> weight_decay,
                  at::ArrayRef<double> l1_weight_decay, at::IntArrayRef group_sizes, bool maximize,
                  const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
                  const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& grad_norm,
                  double max_grad_norm, std::optional<at::TensorList> master_params,
                  std::optional<at::TensorList> param_remainders, std::optional<int64_t> stochastic_seed,
                  std::optional<at::TensorList> state_steps);

// lamb_step_, lamb_moments_ and lamb_apply_ take the same arguments (lamb_apply_ adds the norms first).
using Lamb = void(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                  at::TensorList state_steps, at::ArrayRef<double> lr, at::ArrayRef<double> beta1,
                  at::ArrayRef<double> beta2, at::ArrayRef<double> weight_decay, at::ArrayRef<double> eps,
                  at::ArrayRef<double> l1_weight_decay, at::IntArrayRef group_sizes, bool maximize,
                  const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
                  const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& grad_norm,
                  double max_grad_norm, std::optional<at::TensorList> master_params,
                  std::optional<at::TensorList> param_remainders, std::optional<int64_t> stochastic_seed);

using Adagrad = void(at::TensorList params, at::TensorList grads, at::TensorList state_sums, at::TensorList state_steps,
                     at::ArrayRef<double> lr, at::ArrayRef<double> lr_decay, at::ArrayRef<double> weight_decay,
                     at::ArrayRef<double> eps, at::ArrayRef<double> l1_weight_decay, at::IntArrayRef group_sizes,
                     bool maximize, const std::optional<at::Tensor>& lr_tensor,
                     const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                     const std::optional<at::Tensor>& grad_norm, double max_grad_norm,
                     std::optional<at::TensorList> master_params, std::optional<at::TensorList> param_remainders,
                     std::optional<int64_t> stochastic_seed);

using Rmsprop = void(at::TensorList params, at::TensorList grads, at::TensorList square_avgs, at::TensorList grad_avgs,
                     at::TensorList momentum_buffers, at::TensorList state_steps, at::ArrayRef<double> lr,
                     at::ArrayRef<double> alpha, at::ArrayRef<double> eps, at::ArrayRef<double> weight_decay,
                     at::ArrayRef<double> momentum, at::ArrayRef<double> l1_weight_decay,
                     at::IntArrayRef group_sizes, bool centered, bool maximize,
                     const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& grad_norm,
                     double max_grad_norm, std::optional<at::TensorList> master_params,
                     std::optional<at::TensorList> param_remainders, std::optional<int64_t> stochastic_seed);

}  // namespace pyoptim::step_ops
