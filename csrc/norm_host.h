// Host-side checks for the norm ops (layer_norm_fwd/_bwd, rms_norm_fwd/_bwd),
// shared by the CPU and CUDA launchers so both reject the same inputs with
// the same messages (torch's own where torch has one); pyoptim/_validation.py
// mirrors them for the Python backends and the fake kernels.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

namespace pyoptim {

// The input seen as M rows of N elements (N = prod(normalized_shape)), and
// the shape of the saved statistics: the input's leading dims, then a 1 per
// normalized dim (aten::native_layer_norm's mean/rstd shape).
struct NormDims {
  int64_t M;
  int64_t N;
  std::vector<int64_t> stat_shape;
};

// Throws (TORCH_CHECK) on any bad argument of a forward op. `bias` is
// std::nullopt for RMSNorm. `device_type` is the backend's.
NormDims check_norm_fwd_args(const char* op, bool rms, const at::Tensor& input, c10::IntArrayRef normalized_shape,
                             const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                             c10::DeviceType device_type);

// The forward checks, plus grad_out against input and the saved statistics.
NormDims check_norm_bwd_args(const char* op, bool rms, const at::Tensor& grad_out, const at::Tensor& input,
                             c10::IntArrayRef normalized_shape, const at::Tensor& mean, const at::Tensor& rstd,
                             const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                             c10::DeviceType device_type);

// The input dtypes the norms take: float32, float64, float16, bfloat16.
bool is_norm_dtype(at::ScalarType t);

// A weight, bias or running statistic `name` against the input: the same
// device, and the input's dtype or (for float16/bfloat16 input) float32.
void check_norm_param_placement(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input);

// grad_out against input: same shape, dtype and device (every norm's backward).
void check_norm_grad_out(const char* op, const at::Tensor& grad_out, const at::Tensor& input);

// RMSNorm's eps: as given, else torch.finfo(input.dtype).eps (F.rms_norm's default).
double rms_norm_eps(std::optional<double> eps, at::ScalarType dtype);

// The statistics' dtype: float64 for float64 input, else float32.
at::ScalarType norm_stat_dtype(at::ScalarType input_dtype);

// The dtype of the weight and bias (and of their grads): the weight's, else
// the bias's, else the input's.
at::ScalarType norm_weight_dtype(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias);

// The four ops' entry points (schemas in csrc/ops.cpp) from a backend's two
// launchers, both in LayerNorm's convention (RMSNorm: no bias, no mean):
//   FWD(op, rms, input, normalized_shape, weight, bias, eps) -> (out, mean, rstd)
//   BWD(op, rms, grad_out, input, normalized_shape, mean, rstd, weight, bias,
//       want_dx, want_dw, want_db) -> (grad_input, grad_weight, grad_bias)
template <auto FWD, auto BWD>
struct NormOps {
  using Tensors3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
  using Tensors2 = std::tuple<at::Tensor, at::Tensor>;

  static Tensors3 layer_norm_fwd(const at::Tensor& input, c10::IntArrayRef normalized_shape,
                                 const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                 double eps) {
    return FWD("layer_norm_fwd", false, input, normalized_shape, weight, bias, eps);
  }

  static Tensors3 layer_norm_bwd(const at::Tensor& grad_out, const at::Tensor& input,
                                 c10::IntArrayRef normalized_shape, const at::Tensor& mean, const at::Tensor& rstd,
                                 const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                 std::array<bool, 3> output_mask) {
    return BWD("layer_norm_bwd", false, grad_out, input, normalized_shape, mean, rstd, weight, bias,
               output_mask[0], output_mask[1], output_mask[2]);
  }

  static Tensors2 rms_norm_fwd(const at::Tensor& input, c10::IntArrayRef normalized_shape,
                               const std::optional<at::Tensor>& weight, std::optional<double> eps) {
    auto [out, mean, rstd] = FWD("rms_norm_fwd", true, input, normalized_shape, weight, std::nullopt,
                                 rms_norm_eps(eps, input.scalar_type()));
    return {out, rstd};
  }

  static Tensors2 rms_norm_bwd(const at::Tensor& grad_out, const at::Tensor& input,
                               c10::IntArrayRef normalized_shape, const at::Tensor& rstd,
                               const std::optional<at::Tensor>& weight, std::array<bool, 2> output_mask) {
    auto [dx, dw, db] = BWD("rms_norm_bwd", true, grad_out, input, normalized_shape, rstd, rstd, weight,
                            std::nullopt, output_mask[0], output_mask[1], false);
    return {dx, dw};
  }
};

}  // namespace pyoptim
