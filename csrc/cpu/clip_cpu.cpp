// multi_tensor_norm and clip_scale_ on CPU tensors: the launchers, and their
// TORCH_LIBRARY_IMPL.
#include <limits>
#include <tuple>

#include <ATen/ATen.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <pyoptim/clip.h>
#include <pyoptim/vector_norm.h>

#include "../multi_tensor_host.h"
#include "../message.h"
#include "clip_cpu.h"
#include "cpu_isa.h"

namespace pyoptim::cpu {

namespace {

void run_norm_kernel(const MultiTensorCpuLaunch& L, NormKind kind, double p, double* partial) {
  PYOPTIM_ISA_DISPATCH(norm_kernel, L, kind, p, partial)
}

void run_scale_kernel(const MultiTensorCpuLaunch& L, float coef) { PYOPTIM_ISA_DISPATCH(scale_kernel, L, coef) }

// The launch over `tensors` (dense work copies where needed, kept alive by
// `work`).
MultiTensorCpuLaunch make_launch(MultiTensorWork& work, at::TensorList tensors) {
  MultiTensorCpuLaunch L;
  L.dtype = tensors[0].scalar_type();
  L.ptr.reserve(work.lists[0].size());
  const DataPrefetch ahead({tensors});
  for (const auto i : c10::irange(work.lists[0].size())) {
    ahead(i);
    L.ptr.push_back(work.lists[0][i].data_ptr());
  }
  L.numel = work.numel;
  L.plan = plan_launch_groups(work.numel, kNormCpuChunk, static_cast<int64_t>(tensors.size()),
                              std::numeric_limits<int64_t>::max())
               .at(0);
  return L;
}

template <NormKind K>
std::tuple<double, std::vector<double>> reduce_partials(const LaunchGroup& plan, const std::vector<double>& partial,
                                                        double p) {
  std::vector<double> per_tensor = combine_chunks<K>(plan, partial.data());
  double total = 0.0;
  for (double& acc : per_tensor) {
    total = norm_combine<K>(total, acc);
    acc = norm_finish<K>(acc, p);
  }
  return {norm_finish<K>(total, p), std::move(per_tensor)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> multi_tensor_norm_cpu(at::TensorList tensors, double norm_type) {
  const char* op = "multi_tensor_norm";
  const TensorScan scan = check_tensor_lists(op, c10::DeviceType::CPU, {"tensors", tensors}, {});
  PYOPTIM_CHECK(norm_type > 0.0, op, ": norm_type must be positive, got ", norm_type);
  const auto options = at::TensorOptions().dtype(at::kFloat).device(at::kCPU);
  const int64_t n = static_cast<int64_t>(tensors.size());
  if (n == 0) {
    return {at::zeros({}, options), at::empty({0}, options)};
  }
  const int64_t groups[1] = {n};
  MultiTensorWork work = prepare_work({tensors}, {false}, groups, &scan);
  const MultiTensorCpuLaunch L = make_launch(work, tensors);
  std::vector<double> partial(L.plan.num_chunks());
  const NormKind kind = norm_kind(norm_type);
  run_norm_kernel(L, kind, norm_type, partial.data());
  double total = 0.0;
  std::vector<double> per_tensor;
  switch (kind) {
    case NormKind::L1: std::tie(total, per_tensor) = reduce_partials<NormKind::L1>(L.plan, partial, norm_type); break;
    case NormKind::L2: std::tie(total, per_tensor) = reduce_partials<NormKind::L2>(L.plan, partial, norm_type); break;
    case NormKind::Linf:
      std::tie(total, per_tensor) = reduce_partials<NormKind::Linf>(L.plan, partial, norm_type);
      break;
    default: std::tie(total, per_tensor) = reduce_partials<NormKind::Lp>(L.plan, partial, norm_type); break;
  }
  at::Tensor out = at::empty({n}, options);
  float* o = out.data_ptr<float>();
  for (const auto i : c10::irange(n)) {
    o[i] = static_cast<float>(per_tensor[i]);
  }
  return {at::scalar_tensor(static_cast<float>(total), options), out};
}

void clip_scale_cpu(at::TensorList tensors, const at::Tensor& total_norm, double max_norm) {
  const char* op = "clip_scale_";
  const TensorScan scan = check_tensor_lists(op, c10::DeviceType::CPU, {"tensors", tensors}, {});
  PYOPTIM_CHECK(max_norm >= 0.0, op, ": max_norm must be non-negative, got ", max_norm);
  if (tensors.empty()) {
    return;
  }
  check_aux_tensor(op, "total_norm", total_norm, tensors[0].device(), 1, at::kFloat);
  const float coef = clip_coef(total_norm.item<float>(), static_cast<float>(max_norm));
  if (coef == 1.0f) {
    return;  // x * 1 == x: skip the pass
  }
  const int64_t groups[1] = {static_cast<int64_t>(tensors.size())};
  MultiTensorWork work = prepare_work({tensors}, {true}, groups, &scan);
  run_scale_kernel(make_launch(work, tensors), coef);
  work.finish();
}

}  // namespace pyoptim::cpu

TORCH_LIBRARY_IMPL(pyoptim, CPU, m) {
  m.impl("multi_tensor_norm", &pyoptim::cpu::multi_tensor_norm_cpu);
  m.impl("clip_scale_", &pyoptim::cpu::clip_scale_cpu);
}
