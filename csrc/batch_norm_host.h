// Host-side planning and checks for the BatchNorm ops (schemas in
// csrc/ops.cpp), shared by the CPU and CUDA launchers so both read the same
// layouts and reject the same inputs with the same messages (torch's own
// where torch has one); pyoptim/_validation.py mirrors the checks for the
// Python backends and the fake kernels.
#pragma once

#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>

namespace pyoptim {

// An (N, C, *) input seen as (N, C, S), S = prod(shape[2:]) (1 for 2-d input),
// in one of the two layouts the kernels read:
//   NCHW (channels_last = false): element (n, c, s) at (n * C + c) * S + s
//   channels-last (true):         element (n, c, s) at (n * S + s) * C + c,
//     i.e. N * S rows of C.
// A tensor that is both (S == 1 or C == 1) counts as NCHW.
struct BatchNormDims {
  int64_t N;
  int64_t C;
  int64_t S;
  bool channels_last;

  int64_t count() const { return N * S; }  // elements per channel
};

// The input in a layout the kernels read (itself when it is NCHW-contiguous or
// channels-last, else a contiguous copy) and its dims. Outputs shaped like the
// input are at::empty_like(that tensor): its dense strides are kept.
std::pair<at::Tensor, BatchNormDims> batch_norm_layout(const at::Tensor& input);

// A tensor shaped like `like` (the other input of a backward op: grad_out
// against input) in dims' layout: itself when it already is, else a copy.
at::Tensor batch_norm_match_layout(const at::Tensor& t, const BatchNormDims& dims);

// Throws (TORCH_CHECK) on any bad argument of batch_norm_fwd or
// batch_norm_elemt (training false, no running statistics: pass
// require_running = false); `device_type` is the backend's.
void check_batch_norm_fwd_args(const char* op, const at::Tensor& input, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
                               const std::optional<at::Tensor>& running_var, bool training, bool require_running,
                               c10::DeviceType device_type);

// Checks a per-channel statistic (save_mean, invstd, mean_dy, ...): C
// elements of the statistics' dtype on the input's device.
void check_batch_norm_stat(const char* op, const char* name, const at::Tensor& stat, const at::Tensor& input);

}  // namespace pyoptim
