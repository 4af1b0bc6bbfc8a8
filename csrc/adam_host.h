// Host-side checks and layout preparation for adam_step_, shared by the CPU
// and CUDA launchers so both reject the same inputs with the same messages,
// before anything is written.
#pragma once

#include <optional>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <pyoptim/adam.h>

namespace pyoptim {

struct AdamArgs {
  at::TensorList params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps;
  c10::ArrayRef<double> lr, beta1, beta2, weight_decay, eps;
  c10::IntArrayRef group_sizes;
  bool amsgrad, maximize, decoupled_weight_decay;
  const std::optional<at::Tensor>& lr_tensor;
  const std::optional<at::Tensor>& grad_scale;
  const std::optional<at::Tensor>& found_inf;
};

// What the kernels run on: for every tensor i, p[i], g[i], m[i], v[i] (and
// vm[i] with amsgrad) are dense and share one layout, so each can be walked
// as a flat array of numel elements in the same order. Where a caller's
// tensor has other strides or is not dense, the work tensor is a copy, and
// `finish()` copies mutated ones back.
struct AdamWork {
  std::vector<at::Tensor> p, g, m, v, vm;
  std::vector<int64_t> numel;
  std::vector<int64_t> group_of;  // per tensor: its index into `hyper`
  std::vector<AdamHyper> hyper;   // per group
  std::vector<std::pair<at::Tensor, at::Tensor>> writeback;  // (caller's, work)

  void finish();
};

// Throws (TORCH_CHECK) on any bad argument. `device_type` is the backend's.
void check_adam_args(const AdamArgs& a, c10::DeviceType device_type);

AdamWork prepare_adam_work(const AdamArgs& a);

}  // namespace pyoptim
