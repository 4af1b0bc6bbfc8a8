// lamb_step_ on CPU tensors: the launcher, and its TORCH_LIBRARY_IMPL.
#include <algorithm>
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

// The three ops' work, one launcher: lamb_step_ is lamb_moments_ then
// lamb_apply_ with the norms in between (note [LAMB's two passes]).
enum class LambPass { kStep, kMoments, kApply };

at::Tensor run_lamb(const LambArgs& args, LambPass pass, const at::Tensor* norms) {
  const char* op = pass == LambPass::kStep ? "lamb_step_" : pass == LambPass::kMoments ? "lamb_moments_" : "lamb_apply_";
  check_lamb_args(args, c10::DeviceType::CPU, op);
  const int64_t n = static_cast<int64_t>(args.params.size());
  if (pass == LambPass::kApply) {
    check_lamb_norms(op, *norms, args.params);
  }
  at::Tensor out;
  if (pass == LambPass::kMoments) {
    out = at::zeros({2, n}, at::TensorOptions().dtype(at::kDouble));
  }
  // A step with inf/nan grads (GradScaler) changes nothing, steps included.
  if (args.params.empty() || cpu_found_inf(args.aux)) {
    return out;
  }
  MultiTensorWork work = prepare_work({args.params, args.grads, args.exp_avgs, args.exp_avg_sqs},
                                      {pass != LambPass::kMoments, false, pass != LambPass::kApply,
                                       pass != LambPass::kApply},
                                      args.group_sizes);
  LambCpuLaunch L;
  L.dtype = args.params[0].scalar_type();
  L.grad_mul = cpu_grad_multiplier(args.aux, args.maximize);
  const std::vector<double> group_lr = cpu_group_lrs(args.aux, args.lr);
  reserve_each(n, L.p, L.g, L.m, L.v, L.hyper, L.lr, L.step);
  for (const auto i : c10::irange(n)) {
    L.p.push_back(work.lists[0][i].data_ptr());
    L.g.push_back(work.lists[1][i].const_data_ptr());
    L.m.push_back(work.lists[2][i].data_ptr());
    L.v.push_back(work.lists[3][i].data_ptr());
    const int64_t k = work.group_of[i];
    L.hyper.push_back(LambHyper{args.lr[k], args.beta1[k], args.beta2[k], args.eps[k], args.weight_decay[k],
                                group_l1(args.l1_weight_decay, k)});
    L.lr.push_back(group_lr[k]);
    // The apply pass reads the step its moments pass advanced.
    L.step.push_back(pass == LambPass::kApply ? static_cast<double>(*args.state_steps[i].data_ptr<float>())
                                              : cpu_advance_step(args.state_steps[i]));
  }
  L.numel = std::move(work.numel);
  L.plan = plan_launch_groups(L.numel, kLambCpuChunk, n, std::numeric_limits<int64_t>::max()).at(0);
  std::vector<double> p_sq, u_sq;
  if (pass != LambPass::kApply) {
    // Pass 1, then each tensor's squared norms from its chunks' partials in
    // chunk order (the norm's reduction: deterministic).
    std::vector<double> partial(2 * L.plan.num_chunks());
    run_lamb_moments(L, partial.data());
    p_sq = combine_chunks<NormKind::L2>(L.plan, partial.data(), 2);
    u_sq = combine_chunks<NormKind::L2>(L.plan, partial.data() + 1, 2);
  } else {
    const at::Tensor host = norms->contiguous();
    const double* sq = host.const_data_ptr<double>();
    p_sq.assign(sq, sq + n);
    u_sq.assign(sq + n, sq + 2 * n);
  }
  if (pass == LambPass::kMoments) {
    double* o = out.data_ptr<double>();
    std::copy(p_sq.begin(), p_sq.end(), o);
    std::copy(u_sq.begin(), u_sq.end(), o + n);
  } else {
    std::vector<double> ratio(n);
    for (const auto i : c10::irange(n)) {
      ratio[i] = lamb_trust_ratio(p_sq[i], u_sq[i]);
    }
    run_lamb_apply(L, ratio.data());
  }
  work.finish();
  return out;
}

LambArgs lamb_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                   at::TensorList state_steps, at::ArrayRef<double> lr, at::ArrayRef<double> beta1,
                   at::ArrayRef<double> beta2, at::ArrayRef<double> weight_decay, at::ArrayRef<double> eps,
                   at::ArrayRef<double> l1_weight_decay, at::IntArrayRef group_sizes, bool maximize,
                   const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& grad_norm,
                   double max_grad_norm) {
  return LambArgs{params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, beta1, beta2, weight_decay, eps,
                  l1_weight_decay, group_sizes, maximize,
                  StepAux{lr_tensor, grad_scale, found_inf, grad_norm, max_grad_norm}};
}

}  // namespace

void lamb_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                   at::TensorList state_steps, at::ArrayRef<double> lr, at::ArrayRef<double> beta1,
                   at::ArrayRef<double> beta2, at::ArrayRef<double> weight_decay, at::ArrayRef<double> eps,
                   at::ArrayRef<double> l1_weight_decay, at::IntArrayRef group_sizes, bool maximize,
                   const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& grad_norm,
                   double max_grad_norm) {
  run_lamb(lamb_args(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, beta1, beta2, weight_decay, eps,
                     l1_weight_decay, group_sizes, maximize, lr_tensor, grad_scale, found_inf, grad_norm,
                     max_grad_norm),
           LambPass::kStep, nullptr);
}

at::Tensor lamb_moments_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                            at::TensorList exp_avg_sqs, at::TensorList state_steps, at::ArrayRef<double> lr,
                            at::ArrayRef<double> beta1, at::ArrayRef<double> beta2, at::ArrayRef<double> weight_decay,
                            at::ArrayRef<double> eps, at::ArrayRef<double> l1_weight_decay,
                            at::IntArrayRef group_sizes, bool maximize, const std::optional<at::Tensor>& lr_tensor,
                            const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                            const std::optional<at::Tensor>& grad_norm, double max_grad_norm) {
  return run_lamb(lamb_args(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, beta1, beta2, weight_decay, eps,
                            l1_weight_decay, group_sizes, maximize, lr_tensor, grad_scale, found_inf, grad_norm,
                            max_grad_norm),
                  LambPass::kMoments, nullptr);
}

void lamb_apply_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList state_steps, const at::Tensor& norms, at::ArrayRef<double> lr,
                    at::ArrayRef<double> beta1, at::ArrayRef<double> beta2, at::ArrayRef<double> weight_decay,
                    at::ArrayRef<double> eps, at::ArrayRef<double> l1_weight_decay, at::IntArrayRef group_sizes,
                    bool maximize, const std::optional<at::Tensor>& lr_tensor,
                    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                    const std::optional<at::Tensor>& grad_norm, double max_grad_norm) {
  run_lamb(lamb_args(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, beta1, beta2, weight_decay, eps,
                     l1_weight_decay, group_sizes, maximize, lr_tensor, grad_scale, found_inf, grad_norm,
                     max_grad_norm),
           LambPass::kApply, &norms);
}

}  // namespace pyoptim::cpu

TORCH_LIBRARY_IMPL(pyoptim, CPU, m) {
  m.impl("lamb_step_", &pyoptim::cpu::lamb_step_cpu);
  m.impl("lamb_moments_", &pyoptim::cpu::lamb_moments_cpu);
  m.impl("lamb_apply_", &pyoptim::cpu::lamb_apply_cpu);
}
