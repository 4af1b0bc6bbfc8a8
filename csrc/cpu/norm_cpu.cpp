// layer_norm_fwd/_bwd and rms_norm_fwd/_bwd on CPU tensors: the launchers,
// and their TORCH_LIBRARY_IMPL.
#include <algorithm>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../norm_host.h"
#include "cpu_isa.h"
#include "fresh_output.h"
#include "norm_cpu.h"

namespace pyoptim::cpu {

namespace {

void run_fwd(const NormCpuLaunch& launch) { PYOPTIM_ISA_DISPATCH(norm_fwd_kernel, launch) }

void run_bwd(const NormCpuLaunch& launch) { PYOPTIM_ISA_DISPATCH(norm_bwd_kernel, launch) }

// A dense row-major copy when `t` is not one already: the kernels walk raw
// rows, so any other strides would give wrong answers.
at::Tensor dense(const at::Tensor& t) { return t.contiguous(); }

const void* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->const_data_ptr() : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_fwd(const char* op, bool rms, const at::Tensor& input,
                                                        at::IntArrayRef normalized_shape,
                                                        const std::optional<at::Tensor>& weight,
                                                        const std::optional<at::Tensor>& bias, double eps) {
  const NormDims d = check_norm_fwd_args(op, rms, input, normalized_shape, weight, bias, c10::DeviceType::CPU);
  const at::Tensor x = dense(input);
  const std::optional<at::Tensor> w = weight.has_value() && weight->defined() ? std::optional(dense(*weight)) : std::nullopt;
  const std::optional<at::Tensor> b = bias.has_value() && bias->defined() ? std::optional(dense(*bias)) : std::nullopt;
  at::Tensor out = empty_output_like(input, at::MemoryFormat::Contiguous);  // note [huge-page outputs]
  const auto stat_opts = input.options().dtype(norm_stat_dtype(input.scalar_type()));
  at::Tensor mean = rms ? at::Tensor() : at::empty(d.stat_shape, stat_opts);
  at::Tensor rstd = at::empty(d.stat_shape, stat_opts);
  if (d.M > 0 && d.N > 0) {
    NormCpuLaunch L{};
    L.dtype = input.scalar_type();
    L.wdtype = norm_weight_dtype(input, w, b);
    L.rms = rms;
    L.stream_out = out.nbytes() >= static_cast<size_t>(kNormCpuStreamBytes);
    L.M = d.M;
    L.N = d.N;
    L.eps = eps;
    L.x = x.const_data_ptr();
    L.w = ptr_or_null(w);
    L.b = ptr_or_null(b);
    L.out = out.data_ptr();
    L.mean = rms ? nullptr : mean.data_ptr();
    L.rstd = rstd.data_ptr();
    run_fwd(L);
  }
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_bwd(const char* op, bool rms, const at::Tensor& grad_out,
                                                        const at::Tensor& input, at::IntArrayRef normalized_shape,
                                                        const at::Tensor& mean, const at::Tensor& rstd,
                                                        const std::optional<at::Tensor>& weight,
                                                        const std::optional<at::Tensor>& bias,
                                                        bool want_dx, bool want_dw, bool want_db) {
  const NormDims d =
      check_norm_bwd_args(op, rms, grad_out, input, normalized_shape, mean, rstd, weight, bias, c10::DeviceType::CPU);
  const bool has_w = weight.has_value() && weight->defined();
  const bool has_b = bias.has_value() && bias->defined();
  want_dw = want_dw && has_w;
  want_db = want_db && has_b;
  const auto empty = [&] { return at::empty({0}, input.options()); };
  const at::ScalarType wdt = norm_weight_dtype(input, weight, bias);
  // dx is computed whenever any output is wanted: the weight/bias grads come
  // from the same pass (a dx-less pass would save only its writes).
  at::Tensor dx = empty_output_like(input, at::MemoryFormat::Contiguous);  // note [huge-page outputs]
  at::Tensor dw = want_dw ? at::empty(normalized_shape, input.options().dtype(wdt)) : empty();
  at::Tensor db = want_db ? at::empty(normalized_shape, input.options().dtype(wdt)) : empty();
  if (d.N == 0 || d.M == 0) {
    if (want_dw) dw.zero_();
    if (want_db) db.zero_();
  } else if (want_dx || want_dw || want_db) {
    const at::Tensor x = dense(input), dy = dense(grad_out);
    const at::Tensor w = has_w ? dense(*weight) : at::Tensor();
    const at::Tensor mean_c = rms ? at::Tensor() : dense(mean), rstd_c = dense(rstd);
    NormCpuLaunch L{};
    L.dtype = input.scalar_type();
    L.wdtype = wdt;
    L.rms = rms;
    L.stream_out = dx.nbytes() >= static_cast<size_t>(kNormCpuStreamBytes);
    L.M = d.M;
    L.N = d.N;
    L.x = x.const_data_ptr();
    L.dy = dy.const_data_ptr();
    L.w = has_w ? w.const_data_ptr() : nullptr;
    L.mean = rms ? nullptr : const_cast<void*>(mean_c.const_data_ptr());
    L.rstd = const_cast<void*>(rstd_c.const_data_ptr());
    L.out = dx.data_ptr();
    L.dw = want_dw ? dw.data_ptr() : nullptr;
    L.db = want_db ? db.data_ptr() : nullptr;
    // note [deterministic weight grads]: one block per thread (fewer when
    // there are fewer rows); without weight/bias grads, more, smaller blocks
    // balance better and need no partials.
    const int64_t threads = at::get_num_threads();
    L.blocks = (want_dw || want_db) ? std::max<int64_t>(1, std::min<int64_t>(d.M, threads)) : d.M;
    at::Tensor partial;
    if (want_dw || want_db) {
      partial = at::empty({L.blocks, 2, d.N}, input.options().dtype(norm_stat_dtype(input.scalar_type())));
      L.partial = partial.data_ptr();
    }
    run_bwd(L);
  }
  return {want_dx ? dx : empty(), dw, db};
}

}  // namespace

using NormOpsCPU = NormOps<norm_fwd, norm_bwd>;

}  // namespace pyoptim::cpu

TORCH_LIBRARY_IMPL(pyoptim, CPU, m) {
  using Ops = pyoptim::cpu::NormOpsCPU;
  m.impl("layer_norm_fwd", &Ops::layer_norm_fwd);
  m.impl("layer_norm_bwd", &Ops::layer_norm_bwd);
  m.impl("rms_norm_fwd", &Ops::rms_norm_fwd);
  m.impl("rms_norm_bwd", &Ops::rms_norm_bwd);
}
