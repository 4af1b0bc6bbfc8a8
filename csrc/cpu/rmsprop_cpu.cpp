// rmsprop_step_ on CPU tensors: the launcher, and its TORCH_LIBRARY_IMPL.
#include <limits>

#include <ATen/ATen.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include "../optim_host.h"
#include "../step_ops.h"
#include "cpu_isa.h"
#include "rmsprop_cpu.h"

namespace pyoptim::cpu {

namespace {

void run_rmsprop_kernel(const RmspropCpuLaunch& launch) { PYOPTIM_ISA_DISPATCH(rmsprop_kernel, launch) }

}  // namespace

void rmsprop_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                      at::TensorList grad_avgs, at::TensorList momentum_buffers, at::TensorList state_steps,
                      at::ArrayRef<double> lr, at::ArrayRef<double> alpha, at::ArrayRef<double> eps,
                      at::ArrayRef<double> weight_decay, at::ArrayRef<double> momentum,
                      at::ArrayRef<double> l1_weight_decay, at::IntArrayRef group_sizes, bool centered, bool maximize,
                      const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& grad_norm,
                      double max_grad_norm, std::optional<at::TensorList> master_params,
                      std::optional<at::TensorList> param_remainders, std::optional<int64_t> stochastic_seed) {
  const RmspropArgs args{params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps, lr, alpha, eps,
                         weight_decay, momentum, l1_weight_decay, group_sizes, centered, maximize,
                         StepAux{lr_tensor, grad_scale, found_inf, grad_norm, max_grad_norm},
                         PrecisionArgs{master_params, param_remainders, stochastic_seed}};
  const TensorScan scan = check_rmsprop_args(args, c10::DeviceType::CPU);
  // A step with inf/nan grads (GradScaler) changes nothing, steps included.
  if (params.empty() || cpu_found_inf(args.aux)) {
    return;
  }
  const bool has_momentum = !momentum_buffers.empty();
  const at::TensorList extra = args.precision.extra();
  MultiTensorWork work = prepare_work(
      {params, grads, square_avgs, centered ? grad_avgs : at::TensorList(), momentum_buffers, extra},
      {true, false, true, true, true, true}, group_sizes, &scan);
  RmspropCpuLaunch L;
  L.dtype = params[0].scalar_type();
  L.state_dtype = square_avgs[0].scalar_type();
  L.policy = static_cast<MasterWeights>(args.precision.policy());
  L.centered = centered;
  L.momentum = has_momentum;
  L.grad_mul = cpu_grad_multiplier(args.aux, maximize);
  const std::vector<double> group_lr = cpu_group_lrs(args.aux, lr);
  const int64_t n = static_cast<int64_t>(params.size());
  reserve_each(n, L.p, L.g, L.sa, L.ga, L.buf, L.hyper, L.lr, L.extra, L.key);
  const DataPrefetch ahead({params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps});
  for (const auto i : c10::irange(n)) {
    ahead(i);
    L.p.push_back(work.lists[0][i].data_ptr());
    L.g.push_back(work.lists[1][i].const_data_ptr());
    L.sa.push_back(work.lists[2][i].data_ptr());
    if (centered) {
      L.ga.push_back(work.lists[3][i].data_ptr());
    }
    if (has_momentum) {
      L.buf.push_back(work.lists[4][i].data_ptr());
    }
    const int64_t k = work.group_of[i];
    L.hyper.push_back(
        RmspropHyper{lr[k], alpha[k], eps[k], weight_decay[k], momentum[k], group_l1(l1_weight_decay, k)});
    L.lr.push_back(group_lr[k]);
    // Counted, as torch counts it; no formula reads it, stochastic rounding's draws hash it.
    const double step = cpu_advance_step(state_steps[i]);
    L.extra.push_back(extra.empty() ? nullptr : work.lists[5][i].data_ptr());
    L.key.push_back(stochastic_seed ? stochastic_key(*stochastic_seed, step, i) : 0u);
  }
  L.numel = std::move(work.numel);
  L.plan = plan_launch_groups(L.numel, kRmspropCpuChunk, n, std::numeric_limits<int64_t>::max()).at(0);
  run_rmsprop_kernel(L);
  work.finish();
}

static_assert(std::is_same_v<decltype(&rmsprop_step_cpu), step_ops::Rmsprop*>);  // the step plan's call

}  // namespace pyoptim::cpu

TORCH_LIBRARY_IMPL(pyoptim, CPU, m) {
  m.impl("rmsprop_step_", &pyoptim::cpu::rmsprop_step_cpu);
}
