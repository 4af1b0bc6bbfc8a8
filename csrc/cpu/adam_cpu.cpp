// adam_step_ on CPU tensors: the launcher, and its TORCH_LIBRARY_IMPL.
#include <cstdlib>
#include <limits>
#include <cstring>
#include <string>

#include <ATen/ATen.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include "../optim_host.h"
#include "adam_cpu.h"

namespace pyoptim::cpu {

namespace {

enum class Isa { DEFAULT = 0, AVX2 = 1, AVX512 = 2 };

// The widest instruction set both this CPU and ATEN_CPU_CAPABILITY (torch's
// own override, honoured the same way) allow.
Isa detect_isa() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  Isa isa = Isa::DEFAULT;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    isa = Isa::AVX2;
  }
  if (isa == Isa::AVX2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    isa = Isa::AVX512;
  }
  if (const char* env = std::getenv("ATEN_CPU_CAPABILITY")) {
    const std::string want(env);
    if (want == "default") {
      isa = Isa::DEFAULT;
    } else if (want == "avx2" && isa == Isa::AVX512) {
      isa = Isa::AVX2;
    }
  }
  return isa;
#else
  return Isa::DEFAULT;
#endif
}

Isa cpu_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

void run_kernel(const AdamCpuLaunch& launch) {
  switch (cpu_isa()) {
#if defined(__x86_64__)
    case Isa::AVX512: return AVX512::adam_kernel(launch);
    case Isa::AVX2: return AVX2::adam_kernel(launch);
#endif
    default: return DEFAULT::adam_kernel(launch);
  }
}

}  // namespace

const char* cpu_isa_name() {
  switch (cpu_isa()) {
    case Isa::AVX512: return "AVX512";
    case Isa::AVX2: return "AVX2";
    default: return "DEFAULT";
  }
}

void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                   at::ArrayRef<double> lr, at::ArrayRef<double> beta1, at::ArrayRef<double> beta2,
                   at::ArrayRef<double> weight_decay, at::ArrayRef<double> eps, at::IntArrayRef group_sizes,
                   bool amsgrad, bool maximize, bool decoupled_weight_decay,
                   const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& grad_norm,
                   double max_grad_norm) {
  const AdamArgs args{params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2,
                      weight_decay, eps, group_sizes, amsgrad, maximize, decoupled_weight_decay,
                      StepAux{lr_tensor, grad_scale, found_inf, grad_norm, max_grad_norm}};
  check_adam_args(args, c10::DeviceType::CPU);
  // A step with inf/nan grads (GradScaler) changes nothing, steps included.
  if (params.empty() || cpu_found_inf(args.aux)) {
    return;
  }
  MultiTensorWork work = prepare_work({params, grads, exp_avgs, exp_avg_sqs, amsgrad ? max_exp_avg_sqs : at::TensorList()},
                                      {true, false, true, true, true}, group_sizes);
  AdamCpuLaunch L;
  L.dtype = params[0].scalar_type();
  L.amsgrad = amsgrad;
  L.decoupled = decoupled_weight_decay;
  L.grad_mul = cpu_grad_multiplier(args.aux, maximize);
  const int64_t n = static_cast<int64_t>(params.size());
  for (const auto i : c10::irange(n)) {
    L.p.push_back(work.lists[0][i].data_ptr());
    L.g.push_back(work.lists[1][i].const_data_ptr());
    L.m.push_back(work.lists[2][i].data_ptr());
    L.v.push_back(work.lists[3][i].data_ptr());
    if (amsgrad) {
      L.vm.push_back(work.lists[4][i].data_ptr());
    }
    const int64_t k = work.group_of[i];
    L.hyper.push_back(AdamHyper{lr[k], beta1[k], beta2[k], eps[k], weight_decay[k]});
    L.lr.push_back(cpu_lr(args.aux, lr, k));
    float* step = state_steps[i].data_ptr<float>();
    *step += 1.0f;
    L.step.push_back(static_cast<double>(*step));
  }
  L.numel = work.numel;
  L.plan = plan_launch_groups(work.numel, kAdamCpuChunk, n, std::numeric_limits<int64_t>::max()).at(0);
  run_kernel(L);
  work.finish();
}

}  // namespace pyoptim::cpu

TORCH_LIBRARY_IMPL(pyoptim, CPU, m) {
  m.impl("adam_step_", &pyoptim::cpu::adam_step_cpu);
}
