// Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms"):
// the per-element update, shared by the CPU and CUDA kernels. The math
// follows the paper's algorithm as the lion-pytorch package computes it:
//   g = grad * grad_mul                (GradScaler unscale, maximize's sign, clip factor)
//   g = g + l1 * sign(p)               (l1 != 0: math.h's add_l1)
//   p = p * (1 - lr * wd)              (wd != 0: decoupled weight decay)
//   p = p + (-lr) * sign(m * beta1 + (1 - beta1) * g)
//   m = m * beta2 + (1 - beta2) * g
#pragma once

#include <pyoptim/macros.h>
#include <pyoptim/math.h>

namespace pyoptim {

// One parameter group's hyperparameters, as the op receives them.
struct LionHyper {
  double lr;
  double beta1;
  double beta2;
  double weight_decay;
  double l1_weight_decay;
};

inline namespace PYOPTIM_ISA {  // note [ISA namespaces]

template <typename S>
struct LionScalars {
  S grad_mul, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, neg_lr, l1;
  bool has_weight_decay, has_l1;
};

// Computed in double and rounded once, as torch's Python-side scalars are.
template <typename S>
PYOPTIM_HOST_DEVICE inline LionScalars<S> lion_scalars(const LionHyper& h, double lr, double grad_mul) {
  LionScalars<S> s;
  s.grad_mul = static_cast<S>(grad_mul);
  s.decay = static_cast<S>(1.0 - lr * h.weight_decay);
  s.beta1 = static_cast<S>(h.beta1);
  s.one_minus_beta1 = static_cast<S>(1.0 - h.beta1);
  s.beta2 = static_cast<S>(h.beta2);
  s.one_minus_beta2 = static_cast<S>(1.0 - h.beta2);
  s.neg_lr = static_cast<S>(-lr);
  s.l1 = static_cast<S>(h.l1_weight_decay);
  s.has_weight_decay = h.weight_decay != 0.0;
  s.has_l1 = h.l1_weight_decay != 0.0;
  return s;
}

// LionScalars broadcast to the math type M.
template <typename M>
struct LionCoeffs {
  using Ops = MathOps<M>;
  M grad_mul, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, neg_lr, l1;
  bool has_weight_decay, has_l1;

  template <typename S>
  PYOPTIM_HOST_DEVICE PYOPTIM_INLINE explicit LionCoeffs(const LionScalars<S>& s)
      : grad_mul(Ops::splat(s.grad_mul)),
        decay(Ops::splat(s.decay)),
        beta1(Ops::splat(s.beta1)),
        one_minus_beta1(Ops::splat(s.one_minus_beta1)),
        beta2(Ops::splat(s.beta2)),
        one_minus_beta2(Ops::splat(s.one_minus_beta2)),
        neg_lr(Ops::splat(s.neg_lr)),
        l1(Ops::splat(s.l1)),
        has_weight_decay(s.has_weight_decay),
        has_l1(s.has_l1) {}
};

template <typename M>
PYOPTIM_HOST_DEVICE PYOPTIM_INLINE void lion_update(M& p, M g, M& m, const LionCoeffs<M>& c) {
  using Ops = MathOps<M>;
  g = g * c.grad_mul;
  if (c.has_l1) {
    g = add_l1(g, p, c.l1);
  }
  if (c.has_weight_decay) {
    p = p * c.decay;
  }
  p = p + c.neg_lr * Ops::sign(m * c.beta1 + c.one_minus_beta1 * g);
  m = m * c.beta2 + c.one_minus_beta2 * g;
}

}  // namespace PYOPTIM_ISA
}  // namespace pyoptim
