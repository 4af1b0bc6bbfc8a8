// lamb_step_ on CPU tensors: the launcher, and its TORCH_LIBRARY_IMPL.
#include <limits>

#include <ATen/ATen.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <pyoptim/vector_norm.h>

#include "../optim_host.h"
#include "clip_cpu.h"
#include "cpu_isa.h"
#include "lamb_cpu.h"

namespace pyoptim::cpu {

namespace {

void run_lamb_moments(const LambCpuLaunch& L, double* partial) { PYOPTIM_ISA_DISPATCH(lamb_moments_kernel, L, partial) }

void run_lamb_apply(const LambCpuLaunch& L, const double* ratio) { PYOPTIM_ISA_DISPATCH(lamb_apply_kernel, L, ratio) }

}  // namespace

void lamb_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                   at::TensorList state_steps, at::ArrayRef<double> lr, at::ArrayRef<double> beta1,
                   at::ArrayRef<double> beta2, at::ArrayRef<double> weight_decay, at::ArrayRef<double> eps,
                   at::ArrayRef<double> l1_weight_decay, at::IntArrayRef group_sizes, bool maximize,
                   const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& grad_norm,
                   double max_grad_norm) {
  const LambArgs args{params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, beta1, beta2, weight_decay, eps,
                      l1_weight_decay, group_sizes, maximize,
                      StepAux{lr_tensor, grad_scale, found_inf, grad_norm, max_grad_norm}};
  check_lamb_args(args, c10::DeviceType::CPU);
  // A step with inf/nan grads (GradScaler) changes nothing, steps included.
  if (params.empty() || cpu_found_inf(args.aux)) {
    return;
  }
  MultiTensorWork work = prepare_work({params, grads, exp_avgs, exp_avg_sqs}, {true, false, true, true}, group_sizes);
  LambCpuLaunch L;
  L.dtype = params[0].scalar_type();
  L.grad_mul = cpu_grad_multiplier(args.aux, maximize);
  const std::vector<double> group_lr = cpu_group_lrs(args.aux, lr);
  const int64_t n = static_cast<int64_t>(params.size());
  reserve_each(n, L.p, L.g, L.m, L.v, L.hyper, L.lr, L.step);
  for (const auto i : c10::irange(n)) {
    L.p.push_back(work.lists[0][i].data_ptr());
    L.g.push_back(work.lists[1][i].const_data_ptr());
    L.m.push_back(work.lists[2][i].data_ptr());
    L.v.push_back(work.lists[3][i].data_ptr());
    const int64_t k = work.group_of[i];
    L.hyper.push_back(LambHyper{lr[k], beta1[k], beta2[k], eps[k], weight_decay[k], group_l1(l1_weight_decay, k)});
    L.lr.push_back(group_lr[k]);
    L.step.push_back(cpu_advance_step(state_steps[i]));
  }
  L.numel = std::move(work.numel);
  L.plan = plan_launch_groups(L.numel, kLambCpuChunk, n, std::numeric_limits<int64_t>::max()).at(0);
  // Pass 1, then each tensor's squared norms from its chunks' partials in
  // chunk order (the norm's reduction: deterministic), then pass 2.
  std::vector<double> partial(2 * L.plan.num_chunks());
  run_lamb_moments(L, partial.data());
  const std::vector<double> p_sq = combine_chunks<NormKind::L2>(L.plan, partial.data(), 2);
  const std::vector<double> u_sq = combine_chunks<NormKind::L2>(L.plan, partial.data() + 1, 2);
  std::vector<double> ratio(n);
  for (const auto i : c10::irange(n)) {
    ratio[i] = lamb_trust_ratio(p_sq[i], u_sq[i]);
  }
  run_lamb_apply(L, ratio.data());
  work.finish();
}

}  // namespace pyoptim::cpu

TORCH_LIBRARY_IMPL(pyoptim, CPU, m) {
  m.impl("lamb_step_", &pyoptim::cpu::lamb_step_cpu);
}
