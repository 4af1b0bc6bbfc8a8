// lamb_step_ on CPU tensors: the launcher, and its TORCH_LIBRARY_IMPL.
#include <algorithm>
#include <limits>

#include <ATen/ATen.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <pyoptim/vector_norm.h>

#include "../optim_host.h"
#include "../step_ops.h"
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
  const TensorScan scan = check_lamb_args(args, c10::DeviceType::CPU, op);
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
  // The masters or remainders are read by both passes (p's fp32 value), written by the second.
  const at::TensorList extra = args.precision.extra();
  MultiTensorWork work = prepare_work({args.params, args.grads, args.exp_avgs, args.exp_avg_sqs, extra},
                                      {pass != LambPass::kMoments, false, pass != LambPass::kApply,
                                       pass != LambPass::kApply, pass != LambPass::kMoments},
                                      args.group_sizes, &scan);
  LambCpuLaunch L;
  L.dtype = args.params[0].scalar_type();
  L.state_dtype = args.exp_avgs[0].scalar_type();
  L.policy = static_cast<MasterWeights>(args.precision.policy());
  L.grad_mul = cpu_grad_multiplier(args.aux, args.maximize);
  const std::vector<double> group_lr = cpu_group_lrs(args.aux, args.lr);
  reserve_each(n, L.p, L.g, L.m, L.v, L.extra, L.key, L.hyper, L.lr, L.step);
  const DataPrefetch ahead({args.params, args.grads, args.exp_avgs, args.exp_avg_sqs, args.state_steps});
  for (const auto i : c10::irange(n)) {
    ahead(i);
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
    L.extra.push_back(extra.empty() ? nullptr : work.lists[4][i].data_ptr());
    L.key.push_back(args.precision.stochastic_seed ? stochastic_key(*args.precision.stochastic_seed, L.step.back(), i)
                                                   : 0u);
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
                   double max_grad_norm, const std::optional<at::TensorList>& master_params,
                   const std::optional<at::TensorList>& param_remainders,
                   const std::optional<int64_t>& stochastic_seed) {
  return LambArgs{params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, beta1, beta2, weight_decay, eps,
                  l1_weight_decay, group_sizes, maximize,
                  StepAux{lr_tensor, grad_scale, found_inf, grad_norm, max_grad_norm},
                  PrecisionArgs{master_params, param_remainders, stochastic_seed}};
}

}  // namespace

void lamb_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                   at::TensorList state_steps, at::ArrayRef<double> lr, at::ArrayRef<double> beta1,
                   at::ArrayRef<double> beta2, at::ArrayRef<double> weight_decay, at::ArrayRef<double> eps,
                   at::ArrayRef<double> l1_weight_decay, at::IntArrayRef group_sizes, bool maximize,
                   const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& grad_norm,
                   double max_grad_norm, std::optional<at::TensorList> master_params,
                   std::optional<at::TensorList> param_remainders, std::optional<int64_t> stochastic_seed) {
  run_lamb(lamb_args(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, beta1, beta2, weight_decay, eps,
                     l1_weight_decay, group_sizes, maximize, lr_tensor, grad_scale, found_inf, grad_norm,
                     max_grad_norm, master_params, param_remainders, stochastic_seed),
           LambPass::kStep, nullptr);
}

at::Tensor lamb_moments_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                            at::TensorList exp_avg_sqs, at::TensorList state_steps, at::ArrayRef<double> lr,
                            at::ArrayRef<double> beta1, at::ArrayRef<double> beta2, at::ArrayRef<double> weight_decay,
                            at::ArrayRef<double> eps, at::ArrayRef<double> l1_weight_decay,
                            at::IntArrayRef group_sizes, bool maximize, const std::optional<at::Tensor>& lr_tensor,
                            const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                            const std::optional<at::Tensor>& grad_norm, double max_grad_norm,
                            std::optional<at::TensorList> master_params,
                            std::optional<at::TensorList> param_remainders, std::optional<int64_t> stochastic_seed) {
  return run_lamb(lamb_args(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, beta1, beta2, weight_decay, eps,
                            l1_weight_decay, group_sizes, maximize, lr_tensor, grad_scale, found_inf, grad_norm,
                            max_grad_norm, master_params, param_remainders, stochastic_seed),
                  LambPass::kMoments, nullptr);
}

void lamb_apply_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList state_steps, const at::Tensor& norms, at::ArrayRef<double> lr,
                    at::ArrayRef<double> beta1, at::ArrayRef<double> beta2, at::ArrayRef<double> weight_decay,
                    at::ArrayRef<double> eps, at::ArrayRef<double> l1_weight_decay, at::IntArrayRef group_sizes,
                    bool maximize, const std::optional<at::Tensor>& lr_tensor,
                    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                    const std::optional<at::Tensor>& grad_norm, double max_grad_norm,
                    std::optional<at::TensorList> master_params, std::optional<at::TensorList> param_remainders,
                    std::optional<int64_t> stochastic_seed) {
  run_lamb(lamb_args(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, beta1, beta2, weight_decay, eps,
                     l1_weight_decay, group_sizes, maximize, lr_tensor, grad_scale, found_inf, grad_norm,
                     max_grad_norm, master_params, param_remainders, stochastic_seed),
           LambPass::kApply, &norms);
}

static_assert(std::is_same_v<decltype(&lamb_step_cpu), step_ops::Lamb*>);  // the step plan's call

}  // namespace pyoptim::cpu

TORCH_LIBRARY_IMPL(pyoptim, CPU, m) {
  m.impl("lamb_step_", &pyoptim::cpu::lamb_step_cpu);
  m.impl("lamb_moments_", &pyoptim::cpu::lamb_moments_cpu);
  m.impl("lamb_apply_", &pyoptim::cpu::lamb_apply_cpu);
}
