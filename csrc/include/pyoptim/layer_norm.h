// LayerNorm and RMSNorm: the per-row math, shared by the CPU and CUDA kernels.
//
// A row x of N elements (math type S: float for fp32/fp16/bf16 storage,
// double for fp64), weight w and bias b of N elements each, optional:
//   LayerNorm: mean = x0 + sum(x - x0) / N (x0 = x[0], note [shifted mean]),
//              var = sum((x - mean)^2) / N
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
#include <cstdint>

#include <pyoptim/macros.h>
#include <pyoptim/math.h>
#include <pyoptim/welford.h>

namespace pyoptim {
inline namespace PYOPTIM_ISA {  // note [ISA namespaces]

// rstd from the row's variance (for RMSNorm: its mean square). The division
// rounds correctly (torch's CPU kernels' 1 / sqrt; CUDA's rsqrtf would not).
template <typename S>
PYOPTIM_HOST_DEVICE PYOPTIM_INLINE S norm_rstd(S var, S eps) {
  // var < 0 (rounding) clamps to 0; a NaN var (a NaN or inf in the row) stays NaN, as torch's.
  return S(1) / MathOps<S>::sqrt((var < S(0) ? S(0) : var) + eps);
}

// note [shifted mean]: a row's mean as x0 + sum(x - x0) / N, x0 the row's
// first element. A constant row (or one repeated value) then has its value
// as its mean exactly, so var and xhat are exactly 0 and y = b, as torch's
// Welford moments give; sum(x) / N would miss the value by an ulp, and rstd
// (up to 1 / sqrt(eps)) would scale that into y. A large offset over a small
// spread also keeps the sum's rounding to the spread's size. A non-finite x0
// makes the mean NaN, and the row NaN, as torch's is for a row with an inf.
template <typename S>
PYOPTIM_HOST_DEVICE PYOPTIM_INLINE S norm_shifted_mean(S x0, S shifted_sum, int64_t N) {
  return x0 + shifted_sum / static_cast<S>(N);
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
