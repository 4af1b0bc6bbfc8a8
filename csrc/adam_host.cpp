#include "adam_host.h"

#include <ATen/ATen.h>
#include <c10/util/irange.h>

namespace pyoptim {

namespace {

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_like_param(const char* list, int64_t i, const at::Tensor& t, const at::Tensor& p) {
  TORCH_CHECK(t.defined(), "adam_step_: ", list, "[", i, "] is undefined");
  TORCH_CHECK(t.layout() == at::kStrided, "adam_step_: ", list, "[", i, "] is sparse (layout ",
              t.layout(), "); Adam does not support sparse gradients, please consider SparseAdam instead");
  TORCH_CHECK(t.device() == p.device(), "adam_step_: ", list, "[", i, "] is on ", t.device(),
              " but params[", i, "] is on ", p.device());
  TORCH_CHECK(t.scalar_type() == p.scalar_type(), "adam_step_: ", list, "[", i, "] has dtype ",
              t.scalar_type(), " but params[", i, "] has dtype ", p.scalar_type());
  TORCH_CHECK(t.sizes() == p.sizes(), "adam_step_: ", list, "[", i, "] has shape ", t.sizes(),
              " but params[", i, "] has shape ", p.sizes());
}

void check_scalar_tensor(const char* name, const std::optional<at::Tensor>& t, const at::Device& dev,
                         int64_t numel, at::ScalarType dtype = at::kFloat) {
  if (!t.has_value()) {
    return;
  }
  TORCH_CHECK(t->device() == dev, "adam_step_: ", name, " is on ", t->device(), " but params are on ", dev);
  TORCH_CHECK(t->scalar_type() == dtype, "adam_step_: ", name, " must be ", dtype, ", got ",
              t->scalar_type());
  TORCH_CHECK(t->numel() == numel, "adam_step_: ", name, " must have ", numel, " element(s), got ",
              t->numel());
}

// Work tensor for `t` in the layout of `layout_of` (a dense tensor).
at::Tensor in_layout(const at::Tensor& t, const at::Tensor& layout_of) {
  if (t.strides() == layout_of.strides() && t.is_non_overlapping_and_dense()) {
    return t;
  }
  return at::empty_like(layout_of).copy_(t);
}

}  // namespace

void AdamWork::finish() {
  for (auto& [caller, work] : writeback) {
    caller.copy_(work);
  }
  writeback.clear();
}

void check_adam_args(const AdamArgs& a, c10::DeviceType device_type) {
  const int64_t n = static_cast<int64_t>(a.params.size());
  TORCH_CHECK(static_cast<int64_t>(a.grads.size()) == n && static_cast<int64_t>(a.exp_avgs.size()) == n &&
                  static_cast<int64_t>(a.exp_avg_sqs.size()) == n &&
                  static_cast<int64_t>(a.state_steps.size()) == n,
              "adam_step_: params, grads, exp_avgs, exp_avg_sqs and state_steps must have the same length, got ",
              n, ", ", a.grads.size(), ", ", a.exp_avgs.size(), ", ", a.exp_avg_sqs.size(), ", ",
              a.state_steps.size());
  TORCH_CHECK(!a.amsgrad || static_cast<int64_t>(a.max_exp_avg_sqs.size()) == n,
              "adam_step_: amsgrad needs one max_exp_avg_sqs entry per param, got ",
              a.max_exp_avg_sqs.size(), " for ", n, " params");
  const int64_t groups = static_cast<int64_t>(a.group_sizes.size());
  TORCH_CHECK(static_cast<int64_t>(a.lr.size()) == groups && static_cast<int64_t>(a.beta1.size()) == groups &&
                  static_cast<int64_t>(a.beta2.size()) == groups &&
                  static_cast<int64_t>(a.weight_decay.size()) == groups &&
                  static_cast<int64_t>(a.eps.size()) == groups,
              "adam_step_: lr, beta1, beta2, weight_decay and eps need one value per group (",
              groups, " groups)");
  int64_t total = 0;
  for (const auto k : c10::irange(groups)) {
    TORCH_CHECK(a.group_sizes[k] >= 0, "adam_step_: group_sizes[", k, "] is negative");
    total += a.group_sizes[k];
    TORCH_CHECK(a.lr[k] >= 0.0, "adam_step_: Invalid learning rate: ", a.lr[k], " (group ", k, ")");
    TORCH_CHECK(a.eps[k] >= 0.0, "adam_step_: Invalid epsilon value: ", a.eps[k], " (group ", k, ")");
    TORCH_CHECK(a.beta1[k] >= 0.0 && a.beta1[k] < 1.0, "adam_step_: Invalid beta parameter at index 0: ",
                a.beta1[k], " (group ", k, ")");
    TORCH_CHECK(a.beta2[k] >= 0.0 && a.beta2[k] < 1.0, "adam_step_: Invalid beta parameter at index 1: ",
                a.beta2[k], " (group ", k, ")");
    TORCH_CHECK(a.weight_decay[k] >= 0.0, "adam_step_: Invalid weight_decay value: ", a.weight_decay[k],
                " (group ", k, ")");
  }
  TORCH_CHECK(total == n, "adam_step_: group_sizes add up to ", total, " but there are ", n, " params");
  if (n == 0) {
    return;
  }
  const at::Tensor& p0 = a.params[0];
  for (const auto i : c10::irange(n)) {
    const at::Tensor& p = a.params[i];
    TORCH_CHECK(p.defined(), "adam_step_: params[", i, "] is undefined");
    TORCH_CHECK(p.device().type() == device_type, "adam_step_: params[", i, "] is on ", p.device(),
                ", expected a ", device_type, " tensor");
    TORCH_CHECK(p.layout() == at::kStrided, "adam_step_: params[", i, "] is not a strided tensor");
    TORCH_CHECK(p.device() == p0.device(), "adam_step_: params[", i, "] is on ", p.device(),
                " but params[0] is on ", p0.device(), "; one call takes one device");
    TORCH_CHECK(is_supported_dtype(p.scalar_type()), "adam_step_: params[", i, "] has dtype ",
                p.scalar_type(), "; supported are float32, float64, float16 and bfloat16");
    TORCH_CHECK(p.scalar_type() == p0.scalar_type(), "adam_step_: params[", i, "] has dtype ",
                p.scalar_type(), " but params[0] has ", p0.scalar_type(), "; one call takes one dtype");
    check_like_param("grads", i, a.grads[i], p);
    check_like_param("exp_avgs", i, a.exp_avgs[i], p);
    check_like_param("exp_avg_sqs", i, a.exp_avg_sqs[i], p);
    if (a.amsgrad) {
      check_like_param("max_exp_avg_sqs", i, a.max_exp_avg_sqs[i], p);
    }
    const at::Tensor& s = a.state_steps[i];
    TORCH_CHECK(s.defined() && s.numel() == 1 && s.scalar_type() == at::kFloat,
                "adam_step_: state_steps[", i, "] must be a float32 tensor of one element");
    TORCH_CHECK(s.device() == p.device(), "adam_step_: state_steps[", i, "] is on ", s.device(),
                " but params[", i, "] is on ", p.device());
  }
  check_scalar_tensor("lr_tensor", a.lr_tensor, p0.device(), groups, at::kDouble);
  check_scalar_tensor("grad_scale", a.grad_scale, p0.device(), 1);
  check_scalar_tensor("found_inf", a.found_inf, p0.device(), 1);
}

AdamWork prepare_adam_work(const AdamArgs& a) {
  AdamWork w;
  const int64_t n = static_cast<int64_t>(a.params.size());
  w.p.reserve(n);
  w.g.reserve(n);
  w.m.reserve(n);
  w.v.reserve(n);
  w.numel.reserve(n);
  for (const auto k : c10::irange(a.group_sizes.size())) {
    w.hyper.push_back(AdamHyper{a.lr[k], a.beta1[k], a.beta2[k], a.eps[k], a.weight_decay[k]});
    for (int64_t j = 0; j < a.group_sizes[k]; ++j) {
      w.group_of.push_back(static_cast<int64_t>(k));
    }
  }
  auto mutated = [&w](const at::Tensor& caller, const at::Tensor& layout_of) {
    at::Tensor work = in_layout(caller, layout_of);
    if (!work.is_same(caller)) {
      w.writeback.emplace_back(caller, work);
    }
    return work;
  };
  for (const auto i : c10::irange(n)) {
    const at::Tensor& p = a.params[i];
    // The layout every work tensor of this param shares: the param's own when
    // it is dense (no copy in the common case), else contiguous.
    at::Tensor layout_of = p.is_non_overlapping_and_dense() ? p : at::empty_like(p, at::MemoryFormat::Contiguous);
    w.p.push_back(mutated(p, layout_of));
    w.g.push_back(in_layout(a.grads[i], layout_of));
    w.m.push_back(mutated(a.exp_avgs[i], layout_of));
    w.v.push_back(mutated(a.exp_avg_sqs[i], layout_of));
    if (a.amsgrad) {
      w.vm.push_back(mutated(a.max_exp_avg_sqs[i], layout_of));
    }
    w.numel.push_back(p.numel());
  }
  return w;
}

}  // namespace pyoptim
