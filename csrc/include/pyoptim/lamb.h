// LAMB (You et al., 2019, "Large Batch Optimization for Deep Learning"): the
// per-element math, shared by the CPU and CUDA kernels. Per tensor, with
// bc1 = 1 - beta1^step and bc2 = 1 - beta2^step (`step` already advanced):
//   g = grad * grad_mul                       (GradScaler unscale, maximize's sign, global clip factor)
//   g = g + l1 * sign(p)                      (l1 != 0: math.h's add_l1)
//   m = m * beta1 + (1 - beta1) * g
//   v = v * beta2 + (1 - beta2) * g * g
//   u = (m / bc1) / (sqrt(v / bc2) + eps) + wd * p
//   r = ||p|| / ||u||   (r = 1 where either norm is 0)
//   p = p - lr * r * u
// in two passes: lamb_moments (m, v written) with lamb_direction (u, from m
// and v as stored, i.e. rounded to the storage type; p*p and u*u summed per
// tensor) and, once each tensor's r is known, lamb_apply (u recomputed from
// the stored m, v and p, never stored itself): r is the ratio of the very u
// that is applied, in every storage type.
#pragma once

#include <cmath>

#include <pyoptim/macros.h>
#include <pyoptim/math.h>

namespace pyoptim {

// One parameter group's hyperparameters, as the op receives them.
struct LambHyper {
  double lr;
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
  double l1_weight_decay;
};

inline namespace PYOPTIM_ISA {  // note [ISA namespaces]

template <typename S>
struct LambScalars {
  S grad_mul, beta1, one_minus_beta1, beta2, one_minus_beta2, bc1, bc2, eps, weight_decay, l1;
  S neg_lr_ratio;  // -lr * r (lamb_apply only)
  bool has_weight_decay, has_l1;
};

// `ratio` is the tensor's trust ratio r (1 in the first pass, where it is unused).
template <typename S>
PYOPTIM_HOST_DEVICE inline LambScalars<S> lamb_scalars(const LambHyper& h, double lr, double step, double grad_mul,
                                                       double ratio) {
  LambScalars<S> s;
  s.grad_mul = static_cast<S>(grad_mul);
  s.beta1 = static_cast<S>(h.beta1);
  s.one_minus_beta1 = static_cast<S>(1.0 - h.beta1);
  s.beta2 = static_cast<S>(h.beta2);
  s.one_minus_beta2 = static_cast<S>(1.0 - h.beta2);
  s.bc1 = static_cast<S>(1.0 - ::pow(h.beta1, step));
  s.bc2 = static_cast<S>(1.0 - ::pow(h.beta2, step));
  s.eps = static_cast<S>(h.eps);
  s.weight_decay = static_cast<S>(h.weight_decay);
  s.l1 = static_cast<S>(h.l1_weight_decay);
  s.neg_lr_ratio = static_cast<S>(-lr * ratio);
  s.has_weight_decay = h.weight_decay != 0.0;
  s.has_l1 = h.l1_weight_decay != 0.0;
  return s;
}

template <typename M>
struct LambCoeffs {
  using Ops = MathOps<M>;
  M grad_mul, beta1, one_minus_beta1, beta2, one_minus_beta2, bc1, bc2, eps, weight_decay, l1, neg_lr_ratio;
  bool has_weight_decay, has_l1;

  template <typename S>
  PYOPTIM_HOST_DEVICE PYOPTIM_INLINE explicit LambCoeffs(const LambScalars<S>& s)
      : grad_mul(Ops::splat(s.grad_mul)),
        beta1(Ops::splat(s.beta1)),
        one_minus_beta1(Ops::splat(s.one_minus_beta1)),
        beta2(Ops::splat(s.beta2)),
        one_minus_beta2(Ops::splat(s.one_minus_beta2)),
        bc1(Ops::splat(s.bc1)),
        bc2(Ops::splat(s.bc2)),
        eps(Ops::splat(s.eps)),
        weight_decay(Ops::splat(s.weight_decay)),
        l1(Ops::splat(s.l1)),
        neg_lr_ratio(Ops::splat(s.neg_lr_ratio)),
        has_weight_decay(s.has_weight_decay),
        has_l1(s.has_l1) {}
};

// The update direction u from the new moments.
template <typename M>
PYOPTIM_HOST_DEVICE PYOPTIM_INLINE M lamb_direction(M p, M m, M v, const LambCoeffs<M>& c) {
  using Ops = MathOps<M>;
  M u = (m / c.bc1) / (Ops::sqrt(v / c.bc2) + c.eps);
  if (c.has_weight_decay) {
    u = u + c.weight_decay * p;
  }
  return u;
}

// First pass: the moments (the caller then takes u = lamb_direction(p, m, v)
// from m and v as it stores them).
template <typename M>
PYOPTIM_HOST_DEVICE PYOPTIM_INLINE void lamb_moments(M p, M g, M& m, M& v, const LambCoeffs<M>& c) {
  g = g * c.grad_mul;
  if (c.has_l1) {
    g = add_l1(g, p, c.l1);
  }
  m = m * c.beta1 + c.one_minus_beta1 * g;
  v = v * c.beta2 + c.one_minus_beta2 * g * g;
}

// Second pass: p moved by -lr * r along u.
template <typename M>
PYOPTIM_HOST_DEVICE PYOPTIM_INLINE void lamb_apply(M& p, M m, M v, const LambCoeffs<M>& c) {
  p = p + c.neg_lr_ratio * lamb_direction(p, m, v, c);
}

// The trust ratio from the two squared norms (accumulated in double).
PYOPTIM_HOST_DEVICE inline double lamb_trust_ratio(double p_sq, double u_sq) {
  const double p_norm = ::sqrt(p_sq);
  const double u_norm = ::sqrt(u_sq);
  return (p_norm > 0.0 && u_norm > 0.0) ? p_norm / u_norm : 1.0;
}

}  // namespace PYOPTIM_ISA
}  // namespace pyoptim
