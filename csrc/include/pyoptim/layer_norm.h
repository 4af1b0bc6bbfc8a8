// LayerNorm and RMSNorm: the per-row math, shared by the CPU and CUDA kernels.
//
// A row x of N elements (math type S: float for fp32/fp16/bf16 storage,
// double for fp64), weight w and bias b of N elements each, optional:
//   LayerNorm: mean = sum(x) / N, var = sum((x - mean)^2) / N
//   RMSNorm:   mean = 0,          var = sum(x^2) / N
//   rstd = 1 / sqrt(var + eps)
//   xhat = (x - mean) * rstd
//   y    = xhat * w + b
// and the backward, with g = dy * w (dy without weight):
//   c1 = sum(g) / N (LayerNorm; 0 for RMSNorm), c2 = sum(g * xhat) / N
//   dx = rstd * (g - c1 - xhat * c2)
//   dw = sum over rows of dy * xhat, db = sum over rows of dy
// RMSNorm is LayerNorm with the mean pinned to 0 (and no bias), so every
// kernel takes RMS as a compile-time flag instead of being written twice.
//
// The element functions are templates over a math type M (float or double,
// or at::vec::Vectorized of them on the CPU), as in adam.h.
#pragma once

#include <cmath>

#include <pyoptim/macros.h>
#include <pyoptim/math.h>
#include <pyoptim/welford.h>

namespace pyoptim {
inline namespace PYOPTIM_ISA {  // note [ISA namespaces]

// rstd from the row's variance (for RMSNorm: its mean square). The division
// rounds correctly (torch's CPU kernels' 1 / sqrt; CUDA's rsqrtf would not).
template <typename S>
PYOPTIM_HOST_DEVICE PYOPTIM_INLINE S norm_rstd(S var, S eps) {
  return S(1) / MathOps<S>::sqrt((var > S(0) ? var : S(0)) + eps);
}

// xhat = (x - mean) * rstd; RMSNorm's mean is 0.
template <bool RMS, typename M>
PYOPTIM_HOST_DEVICE PYOPTIM_INLINE M norm_xhat(M x, M mean, M rstd) {
  return RMS ? x * rstd : (x - mean) * rstd;
}

// dx = rstd * (g - c1 - xhat * c2); RMSNorm's c1 is 0.
template <bool RMS, typename M>
PYOPTIM_HOST_DEVICE PYOPTIM_INLINE M norm_dx(M g, M xhat, M rstd, M c1, M c2) {
  return RMS ? rstd * (g - xhat * c2) : rstd * (g - c1 - xhat * c2);
}

}  // namespace PYOPTIM_ISA
}  // namespace pyoptim
