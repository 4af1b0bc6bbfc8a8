#include "batch_norm_host.h"

#include "message.h"
#include "norm_host.h"

#include <ATen/ATen.h>

namespace pyoptim {

namespace {

// (0, 2, 3, ..., dim - 1, 1): the dims of an (N, C, *) tensor in channels-last memory order.
std::vector<int64_t> channels_last_order(int64_t dim) {
  std::vector<int64_t> order{0};
  for (int64_t d = 2; d < dim; ++d) {
    order.push_back(d);
  }
  order.push_back(1);
  return order;
}

// True when `t` (at least 3-d) is dense with dim 1 innermost: dims (0, 2, 3, ..., 1) contiguous.
bool is_channels_last(const at::Tensor& t) {
  return t.dim() >= 3 && t.permute(channels_last_order(t.dim())).is_contiguous();
}

// A per-channel parameter or running statistic: C elements, the input's
// device, the input's dtype or (for float16/bfloat16 input) float32.
void check_channel_param(const char* op, const char* name, const std::optional<at::Tensor>& t,
                         const at::Tensor& input) {
  if (!t.has_value() || !t->defined()) {
    return;
  }
  const int64_t C = input.size(1);
  // torch's own message (aten/src/ATen/native/Normalization.cpp).
  PYOPTIM_CHECK(t->numel() == C, name, " should contain ", C, " elements not ", t->numel());
  check_norm_param_placement(op, name, *t, input);
}

}  // namespace

std::pair<at::Tensor, BatchNormDims> batch_norm_layout(const at::Tensor& input) {
  BatchNormDims d;
  d.N = input.size(0);
  d.C = input.size(1);
  d.S = 1;
  for (int64_t i = 2; i < input.dim(); ++i) {
    d.S *= input.size(i);
  }
  if (input.is_contiguous()) {
    d.channels_last = false;
    return {input, d};
  }
  if (is_channels_last(input)) {
    d.channels_last = true;
    return {input, d};
  }
  d.channels_last = false;
  return {input.contiguous(), d};
}

at::Tensor batch_norm_match_layout(const at::Tensor& t, const BatchNormDims& dims) {
  if (!dims.channels_last) {
    return t.contiguous();
  }
  if (is_channels_last(t) && !t.is_contiguous()) {
    return t;
  }
  // A copy with channels-last strides: (N, S..., C) allocated, then seen as (N, C, S...).
  const std::vector<int64_t> order = channels_last_order(t.dim());
  std::vector<int64_t> back(t.dim());
  for (int64_t i = 0; i < t.dim(); ++i) {
    back[order[i]] = i;
  }
  at::Tensor out = at::empty(t.permute(order).sizes(), t.options()).permute(back);
  out.copy_(t);
  return out;
}

void check_batch_norm_fwd_args(const char* op, const at::Tensor& input, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
                               const std::optional<at::Tensor>& running_var, bool training, bool require_running,
                               c10::DeviceType device_type) {
  PYOPTIM_CHECK(input.dim() >= 2, op, ": expected input of shape (N, C, *), with at least 2 dims, but got input of size ",
                input.sizes());
  PYOPTIM_CHECK(input.device().type() == device_type, op, ": input is on ", input.device(), ", expected a ",
                device_type, " tensor");
  PYOPTIM_CHECK(input.layout() == at::kStrided, op, ": input is not a strided tensor");
  PYOPTIM_CHECK(is_norm_dtype(input.scalar_type()), op, ": input has dtype ", input.scalar_type(),
                "; supported are float32, float64, float16 and bfloat16");
  // torch checks running statistics before weight and bias; so do we, so the first message matches.
  check_channel_param(op, "running_mean", running_mean, input);
  check_channel_param(op, "running_var", running_var, input);
  check_channel_param(op, "weight", weight, input);
  check_channel_param(op, "bias", bias, input);
  const bool has_mean = running_mean.has_value() && running_mean->defined();
  const bool has_var = running_var.has_value() && running_var->defined();
  if (require_running && !training) {
    // torch's own messages.
    PYOPTIM_CHECK(has_mean, "running_mean must be defined in evaluation mode");
    PYOPTIM_CHECK(has_var, "running_var must be defined in evaluation mode");
  }
  // torch's own message and type (TORCH_CHECK_VALUE in aten's batch_norm).
  PYOPTIM_CHECK_VALUE(has_mean == has_var, "running_mean and running_var must either both be None or neither be None");
}

void check_batch_norm_stat(const char* op, const char* name, const at::Tensor& stat, const at::Tensor& input) {
  const int64_t C = input.dim() >= 2 ? input.size(1) : 0;
  PYOPTIM_CHECK(stat.numel() == C, op, ": ", name, " has ", stat.numel(), " elements, expected one per channel (",
                C, ")");
  const at::ScalarType sd = norm_stat_dtype(input.scalar_type());
  PYOPTIM_CHECK(stat.scalar_type() == sd, op, ": ", name, " has dtype ", stat.scalar_type(), ", expected ", sd);
  PYOPTIM_CHECK(stat.device() == input.device(), op, ": ", name, " is on ", stat.device(), " but input is on ",
                input.device());
}

}  // namespace pyoptim
