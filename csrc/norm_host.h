// Host-side checks for the norm ops (layer_norm_fwd/_bwd, rms_norm_fwd/_bwd),
// shared by the CPU and CUDA launchers so both reject the same inputs with
// the same messages (torch's own where torch has one); pyoptim/_validation.py
// mirrors them for the Python backends and the fake kernels.
#pragma once

#include <cstdint>
#include <optional>
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

// RMSNorm's eps: as given, else torch.finfo(input.dtype).eps (F.rms_norm's default).
double rms_norm_eps(std::optional<double> eps, at::ScalarType dtype);

// The statistics' dtype: float64 for float64 input, else float32.
at::ScalarType norm_stat_dtype(at::ScalarType input_dtype);

}  // namespace pyoptim
