// lion_step_ on CPU tensors: the launcher, and its TORCH_LIBRARY_IMPL.
#include <limits>

#include <ATen/ATen.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include "../optim_host.h"
#include "../step_ops.h"
#include "cpu_isa.h"
#include "lion_cpu.h"

namespace pyoptim::cpu {

namespace {

void run_lion_kernel(const LionCpuLaunch& launch) { PYOPTIM_ISA_DISPATCH(lion_kernel, launch) }

}  // namespace

void lion_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::ArrayRef<double> lr,
                   at::ArrayRef<double> beta1, at::ArrayRef<double> beta2, at::ArrayRef<double> weight_decay,
                   at::ArrayRef<double> l1_weight_decay, at::IntArrayRef group_sizes, bool maximize,
                   const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& grad_norm,
                   double max_grad_norm, std::optional<at::TensorList> master_params,
                   std::optional<at::TensorList> param_remainders, std::optional<int64_t> stochastic_seed,
                   std::optional<at::TensorList> state_steps) {
  const LionArgs args{params, grads, exp_avgs, lr, beta1, beta2, weight_decay, l1_weight_decay, group_sizes, maximize,
                      StepAux{lr_tensor, grad_scale, found_inf, grad_norm, max_grad_norm},
                      PrecisionArgs{master_params, param_remainders, stochastic_seed}, state_steps};
  const TensorScan scan = check_lion_args(args, c10::DeviceType::CPU);
  // A step with inf/nan grads (GradScaler) changes nothing.
  if (params.empty() || cpu_found_inf(args.aux)) {
    return;
  }
  const at::TensorList extra = args.precision.extra();
  MultiTensorWork work = prepare_work({params, grads, exp_avgs, extra}, {true, false, true, true}, group_sizes, &scan);
  LionCpuLaunch L;
  L.dtype = params[0].scalar_type();
  L.state_dtype = exp_avgs[0].scalar_type();
  L.policy = static_cast<MasterWeights>(args.precision.policy());
  L.grad_mul = cpu_grad_multiplier(args.aux, maximize);
  const std::vector<double> group_lr = cpu_group_lrs(args.aux, lr);
  const int64_t n = static_cast<int64_t>(params.size());
  reserve_each(n, L.p, L.g, L.m, L.hyper, L.lr, L.extra, L.key);
  const DataPrefetch ahead({params, grads, exp_avgs, state_steps.value_or(at::TensorList())});
  for (const auto i : c10::irange(n)) {
    ahead(i);
    L.p.push_back(work.lists[0][i].data_ptr());
    L.g.push_back(work.lists[1][i].const_data_ptr());
    L.m.push_back(work.lists[2][i].data_ptr());
    const int64_t k = work.group_of[i];
    L.hyper.push_back(LionHyper{lr[k], beta1[k], beta2[k], weight_decay[k], group_l1(l1_weight_decay, k)});
    L.lr.push_back(group_lr[k]);
    L.extra.push_back(extra.empty() ? nullptr : work.lists[3][i].data_ptr());
    const double step = state_steps ? cpu_advance_step((*state_steps)[i]) : 0.0;
    L.key.push_back(stochastic_seed ? stochastic_key(*stochastic_seed, step, i) : 0u);
  }
  L.numel = std::move(work.numel);
  L.plan = plan_launch_groups(L.numel, kLionCpuChunk, n, std::numeric_limits<int64_t>::max()).at(0);
  run_lion_kernel(L);
  work.finish();
}

static_assert(std::is_same_v<decltype(&lion_step_cpu), step_ops::Lion*>);  // the step plan's call

}  // namespace pyoptim::cpu

TORCH_LIBRARY_IMPL(pyoptim, CPU, m) {
  m.impl("lion_step_", &pyoptim::cpu::lion_step_cpu);
}
