// Elementwise helpers the shared per-element math is written in.
//
// The per-element updates in this directory are templates over a math type M:
// `float` or `double` on the GPU and in scalar CPU tails, `at::vec::Vectorized<float>`
// (or <double>) in the vectorized CPU loop. MathOps<M> supplies what plain
// operators cannot (sqrt, max, broadcasting a scalar); the Vectorized
// specialization lives in csrc/cpu/vec_math.h so this header stays CUDA-clean.
#pragma once

#include <cmath>

#include <pyoptim/macros.h>

namespace pyoptim {
inline namespace PYOPTIM_ISA {  // note [ISA namespaces]

template <typename M>
struct MathOps;

template <>
struct MathOps<float> {
  using scalar = float;
  static PYOPTIM_HOST_DEVICE PYOPTIM_INLINE float splat(float x) { return x; }
  static PYOPTIM_HOST_DEVICE PYOPTIM_INLINE float sqrt(float x) { return ::sqrtf(x); }
  static PYOPTIM_HOST_DEVICE PYOPTIM_INLINE float abs(float x) { return ::fabsf(x); }
  static PYOPTIM_HOST_DEVICE PYOPTIM_INLINE float pow(float x, float y) { return ::powf(x, y); }
  static PYOPTIM_HOST_DEVICE PYOPTIM_INLINE float max(float a, float b) {
    // NaN-propagating like torch.maximum (fmaxf would drop the NaN).
    return (a != a || a > b) ? a : b;
  }
  // torch.sign: -1, 0 or 1 (sign(0) = 0, NaN stays NaN).
  static PYOPTIM_HOST_DEVICE PYOPTIM_INLINE float sign(float x) {
    return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : x);
  }
};

template <>
struct MathOps<double> {
  using scalar = double;
  static PYOPTIM_HOST_DEVICE PYOPTIM_INLINE double splat(double x) { return x; }
  static PYOPTIM_HOST_DEVICE PYOPTIM_INLINE double sqrt(double x) { return ::sqrt(x); }
  static PYOPTIM_HOST_DEVICE PYOPTIM_INLINE double abs(double x) { return ::fabs(x); }
  static PYOPTIM_HOST_DEVICE PYOPTIM_INLINE double pow(double x, double y) { return ::pow(x, y); }
  static PYOPTIM_HOST_DEVICE PYOPTIM_INLINE double max(double a, double b) {
    return (a != a || a > b) ? a : b;
  }
  static PYOPTIM_HOST_DEVICE PYOPTIM_INLINE double sign(double x) { return x > 0.0 ? 1.0 : (x < 0.0 ? -1.0 : x); }
};

// torch.lerp's formula (ATen/native/Lerp.h), written so that the weight's side
// of 0.5 is chosen once per call on the host: `lerp_low` for weight < 0.5.
//   weight <  0.5: start + weight * (end - start)
//   weight >= 0.5: end - (end - start) * (1 - weight)
template <typename M>
PYOPTIM_HOST_DEVICE PYOPTIM_INLINE M lerp(M start, M end, M weight, M one_minus_weight, bool lerp_low) {
  return lerp_low ? start + weight * (end - start) : end - (end - start) * one_minus_weight;
}

// L1 regularization folded into a gradient: the gradient of l1 * |p| is
// l1 * sign(p), with sign(0) = 0 as torch's abs backward gives. Every
// optimizer's per-element update calls this right after scaling the grad
// (before its L2 weight decay), when its `l1_weight_decay` is nonzero.
template <typename M>
PYOPTIM_HOST_DEVICE PYOPTIM_INLINE M add_l1(M g, M p, M l1) {
  return g + l1 * MathOps<M>::sign(p);
}

}  // namespace PYOPTIM_ISA
}  // namespace pyoptim
