#include "norm_host.h"

#include <string>

#include "message.h"

#include <ATen/ATen.h>
#include <c10/util/irange.h>

namespace pyoptim {

bool is_norm_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_norm_param_placement(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input) {
  PYOPTIM_CHECK(t.device() == input.device(), op, ": ", name, " is on ", t.device(), " but input is on ",
                input.device());
  const at::ScalarType d = t.scalar_type();
  const bool low = input.scalar_type() == at::kHalf || input.scalar_type() == at::kBFloat16;
  PYOPTIM_CHECK(d == input.scalar_type() || (low && d == at::kFloat), op, ": ", name, " has dtype ", d,
                " but input has dtype ", input.scalar_type(), "; expected ", input.scalar_type(),
                low ? " or Float" : "");
}

void check_norm_grad_out(const char* op, const at::Tensor& grad_out, const at::Tensor& input) {
  PYOPTIM_CHECK(grad_out.sizes() == input.sizes(), op, ": grad_out has shape ", grad_out.sizes(),
                " but input has shape ", input.sizes());
  PYOPTIM_CHECK(grad_out.scalar_type() == input.scalar_type(), op, ": grad_out has dtype ", grad_out.scalar_type(),
                " but input has dtype ", input.scalar_type());
  PYOPTIM_CHECK(grad_out.device() == input.device(), op, ": grad_out is on ", grad_out.device(),
                " but input is on ", input.device());
}

namespace {

std::string join(c10::IntArrayRef v) {
  std::string s;  // note [no ostream in messages]
  for (const auto i : c10::irange(v.size())) {
    s += (i ? ", " : "") + std::to_string(v[i]);
  }
  return s;
}

void check_param(const char* op, const char* name, const std::optional<at::Tensor>& t, const at::Tensor& input,
                 c10::IntArrayRef normalized_shape) {
  if (!t.has_value() || !t->defined()) {
    return;
  }
  // torch's own message (aten/src/ATen/native/layer_norm.h).
  PYOPTIM_CHECK(t->sizes() == normalized_shape, "Expected ", name,
              " to be of same shape as normalized_shape, but got ", name, " of shape ", t->sizes(),
              " and normalized_shape = ", normalized_shape);
  check_norm_param_placement(op, name, *t, input);
}

}  // namespace

at::ScalarType norm_weight_dtype(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias) {
  if (weight.has_value() && weight->defined()) {
    return weight->scalar_type();
  }
  if (bias.has_value() && bias->defined()) {
    return bias->scalar_type();
  }
  return input.scalar_type();
}

at::ScalarType norm_stat_dtype(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// torch's default (aten's rms_norm): the epsilon of the math type, not of the
// stored one: float's for half, bfloat16 and float input (F.rms_norm's docs
// say finfo(input.dtype); its code uses opmath_t), double's for double.
double rms_norm_eps(std::optional<double> eps, at::ScalarType dtype) {
  if (eps.has_value()) {
    return *eps;
  }
  return dtype == at::kDouble ? std::numeric_limits<double>::epsilon() : std::numeric_limits<float>::epsilon();
}

NormDims check_norm_fwd_args(const char* op, bool rms, const at::Tensor& input, c10::IntArrayRef normalized_shape,
                             const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                             c10::DeviceType device_type) {
  const int64_t nd = static_cast<int64_t>(normalized_shape.size());
  PYOPTIM_CHECK(nd >= 1,
              "Expected normalized_shape to be at least 1-dimensional, i.e., containing at least one element, "
              "but got normalized_shape = ", normalized_shape);
  check_param(op, "weight", weight, input, normalized_shape);
  check_param(op, "bias", bias, input, normalized_shape);
  const int64_t axis = input.dim() - nd;
  PYOPTIM_CHECK(axis >= 0 && input.sizes().slice(axis).equals(normalized_shape), "Given normalized_shape=",
              normalized_shape, ", expected input with shape [*", rms ? "" : ", ", join(normalized_shape),
              "], but got input of size", input.sizes());
  PYOPTIM_CHECK(input.device().type() == device_type, op, ": input is on ", input.device(), ", expected a ",
              device_type, " tensor");
  PYOPTIM_CHECK(input.layout() == at::kStrided, op, ": input is not a strided tensor");
  PYOPTIM_CHECK(is_norm_dtype(input.scalar_type()), op, ": input has dtype ", input.scalar_type(),
              "; supported are float32, float64, float16 and bfloat16");
  if (weight.has_value() && bias.has_value() && weight->defined() && bias->defined()) {
    PYOPTIM_CHECK(weight->scalar_type() == bias->scalar_type(), op, ": weight has dtype ", weight->scalar_type(),
                " but bias has dtype ", bias->scalar_type());
  }
  NormDims d;
  d.N = c10::multiply_integers(normalized_shape);
  d.M = d.N == 0 ? 0 : input.numel() / d.N;
  if (d.N == 0) {
    d.M = c10::multiply_integers(input.sizes().slice(0, axis));
  }
  d.stat_shape.assign(input.sizes().begin(), input.sizes().begin() + axis);
  d.stat_shape.resize(input.dim(), 1);
  return d;
}

NormDims check_norm_bwd_args(const char* op, bool rms, const at::Tensor& grad_out, const at::Tensor& input,
                             c10::IntArrayRef normalized_shape, const at::Tensor& mean, const at::Tensor& rstd,
                             const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                             c10::DeviceType device_type) {
  NormDims d = check_norm_fwd_args(op, rms, input, normalized_shape, weight, bias, device_type);
  check_norm_grad_out(op, grad_out, input);
  const at::ScalarType sd = norm_stat_dtype(input.scalar_type());
  for (const at::Tensor* t : {&mean, &rstd}) {
    if (rms && t == &mean) {
      continue;
    }
    const char* name = t == &mean ? "mean" : "rstd";
    PYOPTIM_CHECK(t->numel() == d.M, op, ": ", name, " has ", t->numel(), " elements, expected one per row (", d.M,
                ")");
    PYOPTIM_CHECK(t->scalar_type() == sd, op, ": ", name, " has dtype ", t->scalar_type(), ", expected ", sd);
    PYOPTIM_CHECK(t->device() == input.device(), op, ": ", name, " is on ", t->device(), " but input is on ",
                input.device());
  }
  return d;
}

}  // namespace pyoptim
