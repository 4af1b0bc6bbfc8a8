// adam_step_ on CPU tensors: the launcher, and its TORCH_LIBRARY_IMPL.
#include <ATen/ATen.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include "../adam_host.h"
#include "adam_cpu.h"
#include "cpu_isa.h"

namespace pyoptim::cpu {

namespace {

void run_kernel(const AdamCpuLaunch& launch) { PYOPTIM_CPU_DISPATCH(adam_kernel, launch) }

}  // namespace

void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                   at::ArrayRef<double> lr, at::ArrayRef<double> beta1, at::ArrayRef<double> beta2,
                   at::ArrayRef<double> weight_decay, at::ArrayRef<double> eps, at::IntArrayRef group_sizes,
                   bool amsgrad, bool maximize, bool decoupled_weight_decay,
                   const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf) {
  const AdamArgs args{params, grads,        exp_avgs,     exp_avg_sqs, max_exp_avg_sqs,
                      state_steps, lr,      beta1,        beta2,       weight_decay,
                      eps,    group_sizes,  amsgrad,      maximize,    decoupled_weight_decay,
                      lr_tensor, grad_scale, found_inf};
  check_adam_args(args, c10::DeviceType::CPU);
  if (params.empty()) {
    return;
  }
  // A step with inf/nan grads (GradScaler) changes nothing, steps included.
  if (found_inf.has_value() && found_inf->item<float>() != 0.0f) {
    return;
  }
  AdamWork work = prepare_adam_work(args);

  AdamCpuLaunch L;
  L.dtype = params[0].scalar_type();
  L.amsgrad = amsgrad;
  L.decoupled = decoupled_weight_decay;
  // GradScaler's own inverse: 1 / scale in double, rounded to float.
  const double inv_scale =
      grad_scale.has_value() ? static_cast<double>(static_cast<float>(1.0 / grad_scale->item<float>())) : 1.0;
  L.grad_mul = maximize ? -inv_scale : inv_scale;
  const at::Tensor lr_values = lr_tensor.has_value() ? lr_tensor->contiguous() : at::Tensor();
  const int64_t n = static_cast<int64_t>(params.size());
  for (const auto i : c10::irange(n)) {
    L.p.push_back(work.p[i].data_ptr());
    L.g.push_back(const_cast<void*>(work.g[i].const_data_ptr()));
    L.m.push_back(work.m[i].data_ptr());
    L.v.push_back(work.v[i].data_ptr());
    if (amsgrad) {
      L.vm.push_back(work.vm[i].data_ptr());
    }
    L.numel.push_back(work.numel[i]);
    const int64_t k = work.group_of[i];
    L.hyper.push_back(work.hyper[k]);
    L.lr.push_back(lr_values.defined() ? lr_values.const_data_ptr<double>()[k] : lr[k]);
    float* step = state_steps[i].data_ptr<float>();
    *step += 1.0f;
    L.step.push_back(static_cast<double>(*step));
  }
  L.plan = plan_launch_groups(work.numel, kAdamCpuChunk, n, std::numeric_limits<int64_t>::max()).at(0);
  run_kernel(L);
  work.finish();
}

}  // namespace pyoptim::cpu

TORCH_LIBRARY_IMPL(pyoptim, CPU, m) {
  m.impl("adam_step_", &pyoptim::cpu::adam_step_cpu);
}
