// sgd_step_ on CPU tensors: the launcher, and its TORCH_LIBRARY_IMPL.
#include <limits>

#include <ATen/ATen.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include "../optim_host.h"
#include "../step_ops.h"
#include "cpu_isa.h"
#include "sgd_cpu.h"

namespace pyoptim::cpu {

namespace {

void run_sgd_kernel(const SgdCpuLaunch& launch) { PYOPTIM_ISA_DISPATCH(sgd_kernel, launch) }

}  // namespace

void sgd_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                  at::ArrayRef<double> lr, at::ArrayRef<double> momentum, at::ArrayRef<double> dampening,
                  at::ArrayRef<double> weight_decay, at::ArrayRef<double> l1_weight_decay, at::IntArrayRef group_sizes,
                  bool nesterov, bool maximize, bool is_first_step, const std::optional<at::Tensor>& lr_tensor,
                  const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                  const std::optional<at::Tensor>& grad_norm, double max_grad_norm,
                  std::optional<at::TensorList> master_params, std::optional<at::TensorList> param_remainders,
                  std::optional<int64_t> stochastic_seed, std::optional<at::TensorList> state_steps) {
  const SgdArgs args{params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, l1_weight_decay,
                     group_sizes, nesterov, maximize, is_first_step,
                     StepAux{lr_tensor, grad_scale, found_inf, grad_norm, max_grad_norm},
                     PrecisionArgs{master_params, param_remainders, stochastic_seed}, state_steps};
  const TensorScan scan = check_sgd_args(args, c10::DeviceType::CPU);
  if (params.empty() || cpu_found_inf(args.aux)) {
    return;
  }
  const at::TensorList extra = args.precision.extra();
  MultiTensorWork work =
      prepare_work({params, grads, momentum_buffers, extra}, {true, false, true, true}, group_sizes, &scan);
  SgdCpuLaunch L;
  L.dtype = params[0].scalar_type();
  L.state_dtype = momentum_buffers.empty() ? L.dtype : momentum_buffers[0].scalar_type();
  L.policy = static_cast<MasterWeights>(args.precision.policy());
  L.momentum = !momentum_buffers.empty();
  L.nesterov = nesterov;
  L.first_step = is_first_step;
  L.grad_mul = cpu_grad_multiplier(args.aux, maximize);
  const std::vector<double> group_lr = cpu_group_lrs(args.aux, lr);
  const int64_t n = static_cast<int64_t>(params.size());
  reserve_each(n, L.p, L.g, L.buf, L.hyper, L.lr, L.extra, L.key);
  const DataPrefetch ahead({params, grads, momentum_buffers, state_steps.value_or(at::TensorList())});
  for (const auto i : c10::irange(n)) {
    ahead(i);
    L.p.push_back(work.lists[0][i].data_ptr());
    L.g.push_back(work.lists[1][i].const_data_ptr());
    if (L.momentum) {
      L.buf.push_back(work.lists[2][i].data_ptr());
    }
    const int64_t k = work.group_of[i];
    L.hyper.push_back(SgdHyper{lr[k], momentum[k], dampening[k], weight_decay[k], group_l1(l1_weight_decay, k)});
    L.lr.push_back(group_lr[k]);
    L.extra.push_back(extra.empty() ? nullptr : work.lists[3][i].data_ptr());
    const double step = state_steps ? cpu_advance_step((*state_steps)[i]) : 0.0;
    L.key.push_back(stochastic_seed ? stochastic_key(*stochastic_seed, step, i) : 0u);
  }
  L.numel = std::move(work.numel);
  L.plan = plan_launch_groups(L.numel, kSgdCpuChunk, n, std::numeric_limits<int64_t>::max()).at(0);
  run_sgd_kernel(L);
  work.finish();
}

static_assert(std::is_same_v<decltype(&sgd_step_cpu), step_ops::Sgd*>);  // the step plan's call

}  // namespace pyoptim::cpu

TORCH_LIBRARY_IMPL(pyoptim, CPU, m) {
  m.impl("sgd_step_", &pyoptim::cpu::sgd_step_cpu);
}
