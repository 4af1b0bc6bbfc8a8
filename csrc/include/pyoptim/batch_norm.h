// BatchNorm: the per-channel and per-element math, shared by the CPU and CUDA
// kernels (schemas and layouts in csrc/ops.cpp).
//
// For channel c with count = numel / C elements x (math type S: float for
// fp32/fp16/bf16 storage, double for fp64), weight w and bias b (1 and 0
// when absent):
//   forward, training: mean, m2 = sum((x - mean)^2) by Welford (welford.h),
//     var = m2 / count, invstd = 1 / sqrt(var + eps);
//     running_mean' = (1 - momentum) * running_mean + momentum * mean,
//     running_var'  = (1 - momentum) * running_var + momentum * m2 / (count - 1)
//   forward, eval: mean = running_mean, invstd = 1 / sqrt(running_var + eps)
//   y = (x - mean) * scale + b,  scale = invstd * w
//   backward: sum_dy = sum(dy), sum_dy_xmu = sum(dy * (x - mean)),
//     grad_weight = sum_dy_xmu * invstd, grad_bias = sum_dy;
//     training: dx = (dy - mean_dy - (x - mean) * proj) * scale,
//       mean_dy = sum_dy / count, proj = invstd^2 * sum_dy_xmu / count
//     eval:     dx = dy * scale (mean_dy = proj = 0)
//
// (x - mean) is formed before scaling, not folded into x * scale + shift:
// with |mean| much larger than the spread, the folded form loses the digits
// the normalized value is made of. The element functions are templates over
// a math type M (S, or at::vec::Vectorized<S> on the CPU), as in adam.h.
#pragma once

#include <pyoptim/layer_norm.h>
#include <pyoptim/macros.h>
#include <pyoptim/math.h>
#include <pyoptim/welford.h>

namespace pyoptim {
inline namespace PYOPTIM_ISA {  // note [ISA namespaces]

// What one channel's forward elementwise pass needs.
template <typename S>
struct BatchNormFwdCoeffs {
  S mean;
  S scale;  // invstd * w
  S bias;   // b
};

template <typename S>
PYOPTIM_HOST_DEVICE PYOPTIM_INLINE BatchNormFwdCoeffs<S> batch_norm_fwd_coeffs(S mean, S invstd, S w, S b) {
  return {mean, invstd * w, b};
}

// y = (x - mean) * scale + b
template <typename M>
PYOPTIM_HOST_DEVICE PYOPTIM_INLINE M batch_norm_fwd_elem(M x, M mean, M scale, M b) {
  return (x - mean) * scale + b;
}

// The biased variance that normalizes in training: m2 / count.
template <typename S, typename C>
PYOPTIM_HOST_DEVICE PYOPTIM_INLINE S batch_norm_biased_var(const WelfordState<S, C>& w) {
  return w.m2 / S(w.count);
}

// invstd of a variance: LayerNorm's rstd (correctly rounded 1 / sqrt; a NaN
// variance stays NaN, as in torch's BatchNorm kernels; a negative one, from
// rounding, is taken as 0).
template <typename S>
PYOPTIM_HOST_DEVICE PYOPTIM_INLINE S batch_norm_invstd(S var, S eps) {
  return norm_rstd(var, eps);
}

// One running statistic moved by momentum: (1 - momentum) * running + momentum * batch.
template <typename S>
PYOPTIM_HOST_DEVICE PYOPTIM_INLINE S batch_norm_running(S running, S batch, S momentum) {
  return (S(1) - momentum) * running + momentum * batch;
}

// The unbiased variance the running variance tracks: m2 / (count - 1); for a
// single element torch's division by zero gives inf (m2 = 0: nan), kept here.
template <typename S, typename C>
PYOPTIM_HOST_DEVICE PYOPTIM_INLINE S batch_norm_unbiased_var(const WelfordState<S, C>& w) {
  return w.m2 / (S(w.count) - S(1));
}

// What one channel's backward elementwise pass needs.
template <typename S>
struct BatchNormBwdCoeffs {
  S mean;
  S mean_dy;  // 0 in eval
  S proj;     // invstd^2 * mean_dy_xmu; 0 in eval
  S scale;    // invstd * w
};

// From the channel's reductions already divided by the (global) count.
template <typename S>
PYOPTIM_HOST_DEVICE PYOPTIM_INLINE BatchNormBwdCoeffs<S> batch_norm_bwd_coeffs(S mean, S invstd, S w, S mean_dy,
                                                                              S mean_dy_xmu, bool training) {
  if (!training) {
    return {mean, S(0), S(0), invstd * w};
  }
  return {mean, mean_dy, invstd * invstd * mean_dy_xmu, invstd * w};
}

// dx = (dy - mean_dy - (x - mean) * proj) * scale
template <typename M>
PYOPTIM_HOST_DEVICE PYOPTIM_INLINE M batch_norm_bwd_elem(M dy, M x, M mean, M mean_dy, M proj, M scale) {
  return (dy - mean_dy - (x - mean) * proj) * scale;
}

}  // namespace PYOPTIM_ISA
}  // namespace pyoptim
