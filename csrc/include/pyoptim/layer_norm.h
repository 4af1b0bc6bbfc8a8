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

namespace pyoptim {
inline namespace PYOPTIM_ISA {  // note [ISA namespaces]

// Running mean and sum of squared deviations (Welford), for rows streamed in
// pieces: the CUDA multi-pass path merges one per thread, then per warp.
// `count` is kept in S: exact in float up to 2^24 elements per row. A plain
// aggregate (start from {0, 0, 0}), so it can live in CUDA shared memory.
template <typename S>
struct WelfordState {
  S mean;
  S m2;
  S count;
};

template <typename S>
PYOPTIM_HOST_DEVICE PYOPTIM_INLINE void welford_push(WelfordState<S>& w, S x) {
  w.count += S(1);
  const S delta = x - w.mean;
  w.mean += delta / w.count;
  w.m2 += delta * (x - w.mean);
}

// Chan et al.'s parallel merge: `a` absorbs `b`.
template <typename S>
PYOPTIM_HOST_DEVICE PYOPTIM_INLINE void welford_merge(WelfordState<S>& a, const WelfordState<S>& b) {
  if (b.count == S(0)) {
    return;
  }
  const S count = a.count + b.count;
  const S delta = b.mean - a.mean;
  const S nb_over_n = b.count / count;
  a.mean += delta * nb_over_n;
  a.m2 += b.m2 + delta * delta * a.count * nb_over_n;
  a.count = count;
}

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
