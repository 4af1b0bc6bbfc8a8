#include "optim_host.h"
#include "message.h"

#include <ATen/ATen.h>
#include <c10/util/irange.h>

#include <pyoptim/clip.h>

namespace pyoptim {

void check_step_aux(const char* op, const StepAux& aux, at::TensorList params, int64_t groups) {
  if (params.empty()) {
    return;
  }
  const at::Device device = params[0].device();
  check_aux_tensor(op, "lr_tensor", aux.lr_tensor, device, groups, at::kDouble);
  check_aux_tensor(op, "grad_scale", aux.grad_scale, device, 1, at::kFloat);
  check_aux_tensor(op, "found_inf", aux.found_inf, device, 1, at::kFloat);
  check_aux_tensor(op, "grad_norm", aux.grad_norm, device, 1, at::kFloat);
  PYOPTIM_CHECK(!aux.grad_norm.has_value() || aux.max_grad_norm > 0.0, op, ": max_grad_norm must be positive, got ",
              aux.max_grad_norm);
}

double cpu_grad_multiplier(const StepAux& aux, bool maximize) {
  const float scale = aux.grad_scale.has_value() ? aux.grad_scale->item<float>() : 1.0f;
  const float norm = aux.grad_norm.has_value() ? aux.grad_norm->item<float>() : 0.0f;
  return grad_multiplier(aux.grad_scale.has_value() ? &scale : nullptr, aux.grad_norm.has_value() ? &norm : nullptr,
                         static_cast<float>(aux.max_grad_norm), maximize);
}

bool cpu_found_inf(const StepAux& aux) {
  return aux.found_inf.has_value() && aux.found_inf->item<float>() != 0.0f;
}

std::vector<double> cpu_group_lrs(const StepAux& aux, c10::ArrayRef<double> lr) {
  if (!aux.lr_tensor.has_value()) {
    return lr.vec();
  }
  const at::Tensor values = aux.lr_tensor->contiguous();
  const double* v = values.const_data_ptr<double>();
  return std::vector<double>(v, v + values.numel());
}

double cpu_advance_step(const at::Tensor& step) {
  float* s = step.data_ptr<float>();
  *s += 1.0f;
  return static_cast<double>(*s);
}

namespace {

// torch.optim's beta check: 0 <= beta < 1.
void check_betas(const char* op, c10::ArrayRef<double> beta1, c10::ArrayRef<double> beta2, size_t k) {
  PYOPTIM_CHECK(beta1[k] >= 0.0 && beta1[k] < 1.0, op, ": Invalid beta parameter at index 0: ", beta1[k], " (group ",
                k, ")");
  PYOPTIM_CHECK(beta2[k] >= 0.0 && beta2[k] < 1.0, op, ": Invalid beta parameter at index 1: ", beta2[k], " (group ",
                k, ")");
}

// torch.optim's check of a hyperparameter that must not be negative, with its
// message ("Invalid learning rate: -1", "Invalid weight_decay value: -1"), for group k.
void check_not_negative(const char* op, const char* what, c10::ArrayRef<double> values, size_t k) {
  PYOPTIM_CHECK(values[k] >= 0.0, op, ": Invalid ", what, ": ", values[k], " (group ", k, ")");
}

// The optional step counters of an op that keeps no step (sgd_step_, lion_step_): stochastic rounding's
// random bits hash them, so stochastic_seed needs them (note [stochastic key]). Their entries are
// check_tensor_lists' to check.
void check_policy_steps(const char* op, const PrecisionArgs& precision,
                        const std::optional<at::TensorList>& state_steps, at::TensorList params) {
  PYOPTIM_CHECK(!precision.stochastic_seed || state_steps, op,
                ": stochastic_seed needs state_steps (the step counters its random bits hash)");
  if (state_steps) {
    PYOPTIM_CHECK(state_steps->size() == params.size(), op, ": state_steps has ", state_steps->size(),
                  " entries but params has ", params.size());
  }
}

// A group with momentum needs the momentum buffers (sgd_step_, rmsprop_step_). With no params there is
// nothing to move: the step plan checks the hyperparameters of its calls with empty lists (note
// [exception safety] in pyoptim/optim/_base.py).
void check_momentum_buffers(const char* op, c10::ArrayRef<double> momentum, size_t k, at::TensorList buffers,
                            int64_t n) {
  PYOPTIM_CHECK(n == 0 || !buffers.empty() || momentum[k] == 0.0, op, ": group ", k, " has momentum ", momentum[k],
                " but no momentum_buffers were given");
}

}  // namespace

void check_l1_weight_decay(const char* op, c10::ArrayRef<double> l1_weight_decay, int64_t groups) {
  if (l1_weight_decay.empty()) {
    return;
  }
  PYOPTIM_CHECK(static_cast<int64_t>(l1_weight_decay.size()) == groups, op, ": l1_weight_decay has ",
                l1_weight_decay.size(), " values for ", groups, " groups; one value per group (or none)");
  for (const auto k : c10::irange(groups)) {
    PYOPTIM_CHECK(l1_weight_decay[k] >= 0.0, op, ": Invalid l1_weight_decay value: ", l1_weight_decay[k], " (group ",
                  k, ")");
  }
}

TensorScan check_adam_args(const AdamArgs& a, c10::DeviceType device_type) {
  const char* op = "adam_step_";
  TensorScan scan = check_tensor_lists(op, device_type, {"params", a.params}, {{"grads", a.grads}},
                                       {{"exp_avgs", a.exp_avgs}, {"exp_avg_sqs", a.exp_avg_sqs},
                                        {"max_exp_avg_sqs", a.max_exp_avg_sqs}},
                                       a.state_steps);
  check_precision(op, a.params, a.precision.master_params, a.precision.param_remainders,
                  a.precision.stochastic_seed);
  const int64_t n = static_cast<int64_t>(a.params.size());
  PYOPTIM_CHECK(static_cast<int64_t>(a.grads.size()) == n && static_cast<int64_t>(a.exp_avgs.size()) == n &&
                  static_cast<int64_t>(a.exp_avg_sqs.size()) == n &&
                  static_cast<int64_t>(a.state_steps.size()) == n,
              op, ": params, grads, exp_avgs, exp_avg_sqs and state_steps must have the same length, got ", n, ", ",
              a.grads.size(), ", ", a.exp_avgs.size(), ", ", a.exp_avg_sqs.size(), ", ", a.state_steps.size());
  PYOPTIM_CHECK(!a.amsgrad || static_cast<int64_t>(a.max_exp_avg_sqs.size()) == n, op,
              ": amsgrad needs one max_exp_avg_sqs entry per param, got ", a.max_exp_avg_sqs.size(), " for ", n,
              " params");
  check_group_lists(op, a.group_sizes,
                    {{"lr", a.lr}, {"beta1", a.beta1}, {"beta2", a.beta2}, {"weight_decay", a.weight_decay},
                     {"eps", a.eps}},
                    n);
  for (const auto k : c10::irange(a.group_sizes.size())) {
    PYOPTIM_CHECK(a.lr[k] >= 0.0, op, ": Invalid learning rate: ", a.lr[k], " (group ", k, ")");
    PYOPTIM_CHECK(a.eps[k] >= 0.0, op, ": Invalid epsilon value: ", a.eps[k], " (group ", k, ")");
    PYOPTIM_CHECK(a.beta1[k] >= 0.0 && a.beta1[k] < 1.0, op, ": Invalid beta parameter at index 0: ", a.beta1[k],
                " (group ", k, ")");
    PYOPTIM_CHECK(a.beta2[k] >= 0.0 && a.beta2[k] < 1.0, op, ": Invalid beta parameter at index 1: ", a.beta2[k],
                " (group ", k, ")");
    PYOPTIM_CHECK(a.weight_decay[k] >= 0.0, op, ": Invalid weight_decay value: ", a.weight_decay[k], " (group ", k,
                ")");
  }
  check_l1_weight_decay(op, a.l1_weight_decay, static_cast<int64_t>(a.group_sizes.size()));
  check_step_aux(op, a.aux, a.params, static_cast<int64_t>(a.group_sizes.size()));
  return scan;
}

TensorScan check_sgd_args(const SgdArgs& a, c10::DeviceType device_type) {
  const char* op = "sgd_step_";
  TensorScan scan = check_tensor_lists(op, device_type, {"params", a.params}, {{"grads", a.grads}},
                                       {{"momentum_buffers", a.momentum_buffers}},
                                       a.state_steps.value_or(at::TensorList()));
  check_precision(op, a.params, a.precision.master_params, a.precision.param_remainders,
                  a.precision.stochastic_seed);
  const int64_t n = static_cast<int64_t>(a.params.size());
  PYOPTIM_CHECK(static_cast<int64_t>(a.grads.size()) == n, op, ": params and grads must have the same length, got ", n,
              " and ", a.grads.size());
  check_policy_steps(op, a.precision, a.state_steps, a.params);
  check_group_lists(op, a.group_sizes,
                    {{"lr", a.lr}, {"momentum", a.momentum}, {"dampening", a.dampening},
                     {"weight_decay", a.weight_decay}},
                    n);
  for (const auto k : c10::irange(a.group_sizes.size())) {
    PYOPTIM_CHECK(a.lr[k] >= 0.0, op, ": Invalid learning rate: ", a.lr[k], " (group ", k, ")");
    PYOPTIM_CHECK(a.momentum[k] >= 0.0, op, ": Invalid momentum value: ", a.momentum[k], " (group ", k, ")");
    PYOPTIM_CHECK(a.weight_decay[k] >= 0.0, op, ": Invalid weight_decay value: ", a.weight_decay[k], " (group ", k,
                ")");
    check_momentum_buffers(op, a.momentum, k, a.momentum_buffers, n);
    PYOPTIM_CHECK(!a.nesterov || (a.momentum[k] > 0.0 && a.dampening[k] == 0.0), op,
                ": Nesterov momentum requires a momentum and zero dampening (group ", k, ")");
  }
  check_l1_weight_decay(op, a.l1_weight_decay, static_cast<int64_t>(a.group_sizes.size()));
  check_step_aux(op, a.aux, a.params, static_cast<int64_t>(a.group_sizes.size()));
  return scan;
}

TensorScan check_lion_args(const LionArgs& a, c10::DeviceType device_type) {
  const char* op = "lion_step_";
  TensorScan scan = check_tensor_lists(op, device_type, {"params", a.params}, {{"grads", a.grads}},
                                       {{"exp_avgs", a.exp_avgs}}, a.state_steps.value_or(at::TensorList()));
  check_precision(op, a.params, a.precision.master_params, a.precision.param_remainders,
                  a.precision.stochastic_seed);
  const int64_t n = static_cast<int64_t>(a.params.size());
  PYOPTIM_CHECK(static_cast<int64_t>(a.grads.size()) == n && static_cast<int64_t>(a.exp_avgs.size()) == n, op,
                ": params, grads and exp_avgs must have the same length, got ", n, ", ", a.grads.size(), ", ",
                a.exp_avgs.size());
  check_policy_steps(op, a.precision, a.state_steps, a.params);
  check_group_lists(op, a.group_sizes,
                    {{"lr", a.lr}, {"beta1", a.beta1}, {"beta2", a.beta2}, {"weight_decay", a.weight_decay}}, n);
  for (const auto k : c10::irange(a.group_sizes.size())) {
    PYOPTIM_CHECK(a.lr[k] >= 0.0, op, ": Invalid learning rate: ", a.lr[k], " (group ", k, ")");
    check_betas(op, a.beta1, a.beta2, k);
    PYOPTIM_CHECK(a.weight_decay[k] >= 0.0, op, ": Invalid weight_decay value: ", a.weight_decay[k], " (group ", k,
                  ")");
  }
  check_l1_weight_decay(op, a.l1_weight_decay, static_cast<int64_t>(a.group_sizes.size()));
  check_step_aux(op, a.aux, a.params, static_cast<int64_t>(a.group_sizes.size()));
  return scan;
}

void check_lamb_norms(const char* op, const at::Tensor& norms, at::TensorList params) {
  const int64_t n = static_cast<int64_t>(params.size());
  PYOPTIM_CHECK(norms.defined() && norms.scalar_type() == at::kDouble && norms.dim() == 2 && norms.size(0) == 2 &&
                    norms.size(1) == n,
                op, ": norms must be a float64 tensor of shape [2, ", n, "] (lamb_moments_'s), got ",
                norms.defined() ? norms.sizes() : at::IntArrayRef{});
  if (n > 0) {
    PYOPTIM_CHECK(norms.device() == params[0].device(), op, ": norms is on ", norms.device(), ", expected ",
                  params[0].device());
  }
}

TensorScan check_lamb_args(const LambArgs& a, c10::DeviceType device_type, const char* op) {
  TensorScan scan = check_tensor_lists(op, device_type, {"params", a.params}, {{"grads", a.grads}},
                                       {{"exp_avgs", a.exp_avgs}, {"exp_avg_sqs", a.exp_avg_sqs}}, a.state_steps);
  check_precision(op, a.params, a.precision.master_params, a.precision.param_remainders,
                  a.precision.stochastic_seed);
  const int64_t n = static_cast<int64_t>(a.params.size());
  PYOPTIM_CHECK(static_cast<int64_t>(a.grads.size()) == n && static_cast<int64_t>(a.exp_avgs.size()) == n &&
                    static_cast<int64_t>(a.exp_avg_sqs.size()) == n &&
                    static_cast<int64_t>(a.state_steps.size()) == n,
                op, ": params, grads, exp_avgs, exp_avg_sqs and state_steps must have the same length, got ", n, ", ",
                a.grads.size(), ", ", a.exp_avgs.size(), ", ", a.exp_avg_sqs.size(), ", ", a.state_steps.size());
  check_group_lists(op, a.group_sizes,
                    {{"lr", a.lr}, {"beta1", a.beta1}, {"beta2", a.beta2}, {"weight_decay", a.weight_decay},
                     {"eps", a.eps}},
                    n);
  for (const auto k : c10::irange(a.group_sizes.size())) {
    PYOPTIM_CHECK(a.lr[k] >= 0.0, op, ": Invalid learning rate: ", a.lr[k], " (group ", k, ")");
    PYOPTIM_CHECK(a.eps[k] >= 0.0, op, ": Invalid epsilon value: ", a.eps[k], " (group ", k, ")");
    check_betas(op, a.beta1, a.beta2, k);
    PYOPTIM_CHECK(a.weight_decay[k] >= 0.0, op, ": Invalid weight_decay value: ", a.weight_decay[k], " (group ", k,
                  ")");
  }
  check_l1_weight_decay(op, a.l1_weight_decay, static_cast<int64_t>(a.group_sizes.size()));
  check_step_aux(op, a.aux, a.params, static_cast<int64_t>(a.group_sizes.size()));
  return scan;
}

TensorScan check_adagrad_args(const AdagradArgs& a, c10::DeviceType device_type) {
  const char* op = "adagrad_step_";
  TensorScan scan = check_tensor_lists(op, device_type, {"params", a.params}, {{"grads", a.grads}},
                                       {{"state_sums", a.state_sums}}, a.state_steps);
  check_precision(op, a.params, a.precision.master_params, a.precision.param_remainders,
                  a.precision.stochastic_seed);
  const int64_t n = static_cast<int64_t>(a.params.size());
  PYOPTIM_CHECK(static_cast<int64_t>(a.grads.size()) == n && static_cast<int64_t>(a.state_sums.size()) == n &&
                    static_cast<int64_t>(a.state_steps.size()) == n,
                op, ": params, grads, state_sums and state_steps must have the same length, got ", n, ", ",
                a.grads.size(), ", ", a.state_sums.size(), ", ", a.state_steps.size());
  check_group_lists(op, a.group_sizes,
                    {{"lr", a.lr}, {"lr_decay", a.lr_decay}, {"weight_decay", a.weight_decay}, {"eps", a.eps}}, n);
  for (const auto k : c10::irange(a.group_sizes.size())) {
    // torch.optim.Adagrad's checks, in its order.
    check_not_negative(op, "learning rate", a.lr, k);
    check_not_negative(op, "lr_decay value", a.lr_decay, k);
    check_not_negative(op, "weight_decay value", a.weight_decay, k);
    check_not_negative(op, "epsilon value", a.eps, k);
  }
  check_l1_weight_decay(op, a.l1_weight_decay, static_cast<int64_t>(a.group_sizes.size()));
  check_step_aux(op, a.aux, a.params, static_cast<int64_t>(a.group_sizes.size()));
  return scan;
}

TensorScan check_rmsprop_args(const RmspropArgs& a, c10::DeviceType device_type) {
  const char* op = "rmsprop_step_";
  TensorScan scan = check_tensor_lists(op, device_type, {"params", a.params}, {{"grads", a.grads}},
                                       {{"square_avgs", a.square_avgs}, {"grad_avgs", a.grad_avgs},
                                        {"momentum_buffers", a.momentum_buffers}},
                                       a.state_steps);
  check_precision(op, a.params, a.precision.master_params, a.precision.param_remainders,
                  a.precision.stochastic_seed);
  const int64_t n = static_cast<int64_t>(a.params.size());
  PYOPTIM_CHECK(static_cast<int64_t>(a.grads.size()) == n && static_cast<int64_t>(a.square_avgs.size()) == n &&
                    static_cast<int64_t>(a.state_steps.size()) == n,
                op, ": params, grads, square_avgs and state_steps must have the same length, got ", n, ", ",
                a.grads.size(), ", ", a.square_avgs.size(), ", ", a.state_steps.size());
  PYOPTIM_CHECK(!a.centered || static_cast<int64_t>(a.grad_avgs.size()) == n, op,
                ": centered needs one grad_avgs entry per param, got ", a.grad_avgs.size(), " for ", n, " params");
  check_group_lists(op, a.group_sizes,
                    {{"lr", a.lr}, {"alpha", a.alpha}, {"eps", a.eps}, {"weight_decay", a.weight_decay},
                     {"momentum", a.momentum}},
                    n);
  for (const auto k : c10::irange(a.group_sizes.size())) {
    // torch.optim.RMSprop's checks, in its order.
    check_not_negative(op, "learning rate", a.lr, k);
    check_not_negative(op, "epsilon value", a.eps, k);
    check_not_negative(op, "momentum value", a.momentum, k);
    check_not_negative(op, "weight_decay value", a.weight_decay, k);
    check_not_negative(op, "alpha value", a.alpha, k);
    check_momentum_buffers(op, a.momentum, k, a.momentum_buffers, n);
  }
  check_l1_weight_decay(op, a.l1_weight_decay, static_cast<int64_t>(a.group_sizes.size()));
  check_step_aux(op, a.aux, a.params, static_cast<int64_t>(a.group_sizes.size()));
  return scan;
}

}  // namespace pyoptim
