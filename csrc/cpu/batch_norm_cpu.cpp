// The six BatchNorm ops (schemas in csrc/ops.cpp) on CPU tensors: the
// launchers, and their TORCH_LIBRARY_IMPL at the foot. Checks and layouts
// come from csrc/batch_norm_host.h; the kernels are batch_norm_cpu_kernel.cpp.
#include <algorithm>
#include <array>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <pyoptim/batch_norm.h>

#include "../batch_norm_host.h"
#include "../norm_host.h"
#include "batch_norm_cpu.h"
#include "cpu_isa.h"
#include "fresh_output.h"

namespace pyoptim::cpu {

namespace {

using Tensors2 = std::tuple<at::Tensor, at::Tensor>;
using Tensors3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Tensors5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

void run_stats(const BatchNormCpuLaunch& launch) { PYOPTIM_ISA_DISPATCH(batch_norm_stats_kernel, launch) }

void run_elemt(const BatchNormCpuLaunch& launch) { PYOPTIM_ISA_DISPATCH(batch_norm_elemt_kernel, launch) }

void run_bwd(const BatchNormCpuLaunch& launch) { PYOPTIM_ISA_DISPATCH(batch_norm_bwd_kernel, launch) }

bool given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// A per-channel tensor as the kernels read it: dense [C] of the math type
// (itself in the common case of a float32 parameter beside float32 input).
at::Tensor per_channel(const at::Tensor& t, at::ScalarType math) { return t.reshape({-1}).to(math).contiguous(); }

at::Tensor per_channel(const std::optional<at::Tensor>& t, at::ScalarType math) {
  return given(t) ? per_channel(*t, math) : at::Tensor();
}

const void* ptr(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

// A per-channel result computed in the math type, returned as `dtype`.
at::Tensor as_dtype(const at::Tensor& t, at::ScalarType dtype) { return t.scalar_type() == dtype ? t : t.to(dtype); }

// The launch of an input in the layout batch_norm_layout chose, seen as note
// [batch norm views] says; `blocks` and `partial` follow note [batch norm
// blocks] (csrc/cpu/batch_norm_cpu.h). `partial` owns the scratch.
struct Plan {
  BatchNormCpuLaunch L{};
  at::Tensor partial;
};

// note [batch norm views]: where the two layouts coincide in memory the
// kernels take the one that reads better. One channel (C == 1): NCHW with all
// N * S elements as one run (N = 1). One element per channel and sample
// (S == 1, as BatchNorm1d's (N, C)): channels-last, rows of C.
Plan plan(const at::Tensor& x, const BatchNormDims& d, bool reduce) {
  Plan p;
  BatchNormCpuLaunch& L = p.L;
  L.dtype = x.scalar_type();
  L.N = d.N;
  L.C = d.C;
  L.S = d.S;
  L.channels_last = d.channels_last;
  if (L.C == 1) {
    L.S = d.N * d.S;
    L.N = 1;
    L.channels_last = false;
  } else if (L.S == 1) {
    L.channels_last = true;
  }
  L.blocks = 1;
  if (!reduce) {
    return p;
  }
  // note [batch norm blocks]: the count is cut only as finely as the threads
  // need, and never below kBatchNormCpuMinBlock elements a block.
  const int64_t threads = at::get_num_threads();
  const int64_t count = L.N * L.S;
  const int64_t run_bytes = L.S * static_cast<int64_t>(x.element_size());
  L.sample_major = !L.channels_last && L.C > 1 && run_bytes < kBatchNormCpuShortRunBytes &&
                   (static_cast<int64_t>(x.nbytes()) <= kBatchNormCpuSampleMajorBytes || run_bytes < 64);
  if (L.channels_last || L.sample_major) {
    // Blocks of rows (of runs), every channel in each.
    const int64_t items = L.channels_last ? count : L.N * L.C;
    L.blocks = std::min({threads, std::max<int64_t>(1, count * L.C / kBatchNormCpuMinBlock), items});
  } else if (threads > 1 && L.C % threads != 0 && L.C < 8 * threads) {
    const int64_t max_blocks = std::max<int64_t>(1, count / kBatchNormCpuMinBlock);
    // Too few channels to share evenly: at least 8 items a thread, so the
    // last thread's share is at most an eighth short of the others'.
    L.blocks = std::min((8 * threads + L.C - 1) / L.C, max_blocks);
  }
  L.blocks = std::max<int64_t>(L.blocks, 1);
  const auto math = x.options().dtype(norm_stat_dtype(x.scalar_type()));
  if (L.channels_last || L.sample_major) {
    p.partial = at::empty({L.blocks * 2 * L.C}, math);
  } else if (L.blocks > 1) {
    p.partial = at::empty({L.C * L.blocks * 3}, math);
  }
  L.partial = p.partial.defined() ? p.partial.data_ptr() : nullptr;
  return p;
}

void set_out(BatchNormCpuLaunch& L, at::Tensor& out) {
  L.out = out.data_ptr();
  L.stream_out = out.nbytes() >= static_cast<size_t>(kBatchNormCpuStreamBytes);
}

// out = (x - mean) * invstd * weight + bias, with given per-channel mean and
// invstd ([C], math dtype): the eval forward's and batch_norm_elemt's pass.
void normalize_into(at::Tensor& out, const at::Tensor& x, const BatchNormDims& d,
                    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                    const at::Tensor& mean, const at::Tensor& invstd, at::ScalarType math) {
  if (out.numel() == 0) {
    return;
  }
  const at::Tensor w = per_channel(weight, math), b = per_channel(bias, math);
  Plan p = plan(x, d, /*reduce=*/false);
  p.L.x = x.const_data_ptr();
  set_out(p.L, out);
  p.L.weight = ptr(w);
  p.L.bias = ptr(b);
  p.L.mean = mean.const_data_ptr();
  p.L.invstd = invstd.const_data_ptr();
  run_elemt(p.L);
}

// invstd = 1 / sqrt(running_var + eps) per channel (eval), in the math type.
at::Tensor eval_invstd(const at::Tensor& running_var, double eps, at::ScalarType math) {
  at::Tensor var = per_channel(running_var, math);
  at::Tensor invstd = at::empty_like(var);
  AT_DISPATCH_FLOATING_TYPES(math, "eval_invstd", [&] {
    const scalar_t* v = var.const_data_ptr<scalar_t>();
    scalar_t* r = invstd.data_ptr<scalar_t>();
    for (int64_t c = 0; c < var.numel(); ++c) {
      r[c] = batch_norm_invstd(v[c], static_cast<scalar_t>(eps));
    }
  });
  return invstd;
}

Tensors5 batch_norm_fwd_cpu(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
                            const std::optional<at::Tensor>& running_var, bool training, double momentum,
                            double eps) {
  check_batch_norm_fwd_args("batch_norm_fwd", input, weight, bias, running_mean, running_var, training,
                            /*require_running=*/true, c10::DeviceType::CPU);
  const auto [x, d] = batch_norm_layout(input);
  const at::ScalarType math = norm_stat_dtype(input.scalar_type());
  const auto math_opts = input.options().dtype(math);
  const bool running = given(running_mean);
  at::Tensor out = empty_output_like(x);  // note [huge-page outputs]
  const auto none = [&] { return input.new_empty({0}); };  // new running statistics not moved

  if (!training) {
    // save_mean is a copy (an op's output may not alias its input).
    at::Tensor save_mean = at::empty({d.C}, math_opts);
    save_mean.copy_(running_mean->reshape({-1}));
    at::Tensor save_invstd = eval_invstd(*running_var, eps, math);
    normalize_into(out, x, d, weight, bias, save_mean, save_invstd, math);
    return {out, save_mean, save_invstd, none(), none()};
  }

  at::Tensor save_mean = at::empty({d.C}, math_opts), save_invstd = at::empty({d.C}, math_opts);
  if (d.count() == 0 || d.C == 0) {
    // torch leaves the running statistics as they were; the saved ones are 0.
    save_mean.zero_();
    save_invstd.zero_();
    return {out, save_mean, save_invstd, running ? running_mean->clone() : none(),
            running ? running_var->clone() : none()};
  }
  const at::Tensor w = per_channel(weight, math), b = per_channel(bias, math);
  const at::Tensor rm = per_channel(running_mean, math), rv = per_channel(running_var, math);
  // New running statistics in the math type, returned in the running statistics' dtype.
  at::Tensor new_mean_m, new_var_m;
  if (running) {
    new_mean_m = at::empty({d.C}, math_opts);
    new_var_m = at::empty({d.C}, math_opts);
  }
  Plan p = plan(x, d, /*reduce=*/true);
  BatchNormCpuLaunch& L = p.L;
  L.x = x.const_data_ptr();
  set_out(L, out);
  L.weight = ptr(w);
  L.bias = ptr(b);
  L.momentum = momentum;
  L.eps = eps;
  L.running_mean = ptr(rm);
  L.running_var = ptr(rv);
  L.save_mean = save_mean.data_ptr();
  L.save_invstd = save_invstd.data_ptr();
  L.new_running_mean = running ? new_mean_m.data_ptr() : nullptr;
  L.new_running_var = running ? new_var_m.data_ptr() : nullptr;
  run_stats(L);
  if (!running) {
    return {out, save_mean, save_invstd, none(), none()};
  }
  return {out, save_mean, save_invstd, as_dtype(new_mean_m, running_mean->scalar_type()),
          as_dtype(new_var_m, running_var->scalar_type())};
}

// The backward's launch: the sums (when want_sums) and dx (when want_dx) of
// an input already checked; mean_dy / mean_dy_xmu given (backward_elemt) or
// undefined, invstd undefined when neither dx nor grad_weight is wanted.
struct BwdResult {
  at::Tensor dx, sum_dy, sum_dy_xmu, grad_weight;
};

BwdResult batch_norm_bwd_launch(const at::Tensor& grad_out, const at::Tensor& input,
                                const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                                const at::Tensor& invstd, const at::Tensor& mean_dy, const at::Tensor& mean_dy_xmu,
                                bool training, bool want_dx, bool want_sums, bool want_grad_weight) {
  const auto [x, d] = batch_norm_layout(input);
  const at::ScalarType math = norm_stat_dtype(input.scalar_type());
  const auto math_opts = input.options().dtype(math);
  BwdResult r;
  if (want_dx) {
    r.dx = empty_output_like(x);  // note [huge-page outputs]
  }
  if (want_sums) {
    r.sum_dy = at::empty({d.C}, math_opts);
    r.sum_dy_xmu = at::empty({d.C}, math_opts);
    if (want_grad_weight) {
      r.grad_weight = at::empty({d.C}, math_opts);
    }
  }
  if (d.C == 0 || (!want_dx && !want_sums)) {
    return r;
  }
  if (d.count() == 0) {
    // Sums of nothing are 0 (so is grad_weight); dx has no elements.
    if (want_sums) {
      r.sum_dy.zero_();
      r.sum_dy_xmu.zero_();
      if (want_grad_weight) {
        r.grad_weight.zero_();
      }
    }
    return r;
  }
  const at::Tensor dy = batch_norm_match_layout(grad_out, d);
  const at::Tensor w = per_channel(weight, math);
  const at::Tensor mean_m = per_channel(mean, math);
  const at::Tensor invstd_m = invstd.defined() ? per_channel(invstd, math) : at::Tensor();
  Plan p = plan(x, d, want_sums);
  BatchNormCpuLaunch& L = p.L;
  L.x = x.const_data_ptr();
  L.dy = dy.const_data_ptr();
  if (want_dx) {
    set_out(L, r.dx);
  }
  L.weight = ptr(w);
  L.mean = mean_m.const_data_ptr();
  L.invstd = ptr(invstd_m);
  L.training = training;
  L.mean_dy = ptr(mean_dy);
  L.mean_dy_xmu = ptr(mean_dy_xmu);
  if (want_sums) {
    L.sum_dy = r.sum_dy.data_ptr();
    L.sum_dy_xmu = r.sum_dy_xmu.data_ptr();
    L.grad_weight = want_grad_weight ? r.grad_weight.data_ptr() : nullptr;
  }
  run_bwd(L);
  return r;
}

Tensors3 batch_norm_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& input,
                            const std::optional<at::Tensor>& weight, const at::Tensor& save_mean,
                            const at::Tensor& save_invstd, bool training, std::array<bool, 3> output_mask) {
  const char* op = "batch_norm_bwd";
  check_batch_norm_fwd_args(op, input, weight, std::nullopt, std::nullopt, std::nullopt, training,
                            /*require_running=*/false, c10::DeviceType::CPU);
  check_norm_grad_out(op, grad_out, input);
  check_batch_norm_stat(op, "save_mean", save_mean, input);
  check_batch_norm_stat(op, "save_invstd", save_invstd, input);
  const bool has_w = given(weight);
  const bool want_dx = output_mask[0], want_dw = output_mask[1] && has_w, want_db = output_mask[2];
  // dx needs the sums in training only; the weight's and bias's grads always.
  const bool want_sums = (want_dx && training) || want_dw || want_db;
  BwdResult r = batch_norm_bwd_launch(grad_out, input, weight, save_mean, save_invstd, at::Tensor(), at::Tensor(),
                                      training, want_dx, want_sums, want_dw);
  const at::ScalarType wdtype = has_w ? weight->scalar_type() : input.scalar_type();
  const auto empty = [&] { return input.new_empty({0}); };
  return {want_dx ? r.dx : empty(), want_dw ? as_dtype(r.grad_weight, wdtype) : empty(),
          want_db ? as_dtype(r.sum_dy, wdtype) : empty()};
}

Tensors2 batch_norm_stats_cpu(const at::Tensor& input) {
  check_batch_norm_fwd_args("batch_norm_stats", input, std::nullopt, std::nullopt, std::nullopt, std::nullopt,
                            /*training=*/true, /*require_running=*/false, c10::DeviceType::CPU);
  const auto [x, d] = batch_norm_layout(input);
  const auto math_opts = input.options().dtype(norm_stat_dtype(input.scalar_type()));
  at::Tensor mean = at::empty({d.C}, math_opts), m2 = at::empty({d.C}, math_opts);
  if (d.count() == 0) {
    // Welford's state of no elements.
    mean.zero_();
    m2.zero_();
    return {mean, m2};
  }
  if (d.C == 0) {
    return {mean, m2};
  }
  Plan p = plan(x, d, /*reduce=*/true);
  p.L.x = x.const_data_ptr();
  p.L.save_mean = mean.data_ptr();
  p.L.save_m2 = m2.data_ptr();
  run_stats(p.L);
  return {mean, m2};
}

at::Tensor batch_norm_elemt_cpu(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& bias, const at::Tensor& mean,
                                const at::Tensor& invstd) {
  const char* op = "batch_norm_elemt";
  check_batch_norm_fwd_args(op, input, weight, bias, std::nullopt, std::nullopt, /*training=*/true,
                            /*require_running=*/false, c10::DeviceType::CPU);
  check_batch_norm_stat(op, "mean", mean, input);
  check_batch_norm_stat(op, "invstd", invstd, input);
  const auto [x, d] = batch_norm_layout(input);
  const at::ScalarType math = norm_stat_dtype(input.scalar_type());
  at::Tensor out = empty_output_like(x);  // note [huge-page outputs]
  normalize_into(out, x, d, weight, bias, per_channel(mean, math), per_channel(invstd, math), math);
  return out;
}

Tensors2 batch_norm_backward_reduce_cpu(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean) {
  const char* op = "batch_norm_backward_reduce";
  check_batch_norm_fwd_args(op, input, std::nullopt, std::nullopt, std::nullopt, std::nullopt, /*training=*/true,
                            /*require_running=*/false, c10::DeviceType::CPU);
  check_norm_grad_out(op, grad_out, input);
  check_batch_norm_stat(op, "mean", mean, input);
  BwdResult r = batch_norm_bwd_launch(grad_out, input, std::nullopt, mean, at::Tensor(), at::Tensor(), at::Tensor(),
                                      /*training=*/true, /*want_dx=*/false, /*want_sums=*/true,
                                      /*want_grad_weight=*/false);
  return {r.sum_dy, r.sum_dy_xmu};
}

at::Tensor batch_norm_backward_elemt_cpu(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                                         const at::Tensor& invstd, const std::optional<at::Tensor>& weight,
                                         const at::Tensor& mean_dy, const at::Tensor& mean_dy_xmu) {
  const char* op = "batch_norm_backward_elemt";
  check_batch_norm_fwd_args(op, input, weight, std::nullopt, std::nullopt, std::nullopt, /*training=*/true,
                            /*require_running=*/false, c10::DeviceType::CPU);
  check_norm_grad_out(op, grad_out, input);
  check_batch_norm_stat(op, "mean", mean, input);
  check_batch_norm_stat(op, "invstd", invstd, input);
  check_batch_norm_stat(op, "mean_dy", mean_dy, input);
  check_batch_norm_stat(op, "mean_dy_xmu", mean_dy_xmu, input);
  const at::ScalarType math = norm_stat_dtype(input.scalar_type());
  BwdResult r = batch_norm_bwd_launch(grad_out, input, weight, mean, invstd, per_channel(mean_dy, math),
                                      per_channel(mean_dy_xmu, math), /*training=*/true, /*want_dx=*/true,
                                      /*want_sums=*/false, /*want_grad_weight=*/false);
  return r.dx;
}

}  // namespace

}  // namespace pyoptim::cpu

TORCH_LIBRARY_IMPL(pyoptim, CPU, m) {
  m.impl("batch_norm_fwd", &pyoptim::cpu::batch_norm_fwd_cpu);
  m.impl("batch_norm_bwd", &pyoptim::cpu::batch_norm_bwd_cpu);
  m.impl("batch_norm_stats", &pyoptim::cpu::batch_norm_stats_cpu);
  m.impl("batch_norm_elemt", &pyoptim::cpu::batch_norm_elemt_cpu);
  m.impl("batch_norm_backward_reduce", &pyoptim::cpu::batch_norm_backward_reduce_cpu);
  m.impl("batch_norm_backward_elemt", &pyoptim::cpu::batch_norm_backward_elemt_cpu);
}
