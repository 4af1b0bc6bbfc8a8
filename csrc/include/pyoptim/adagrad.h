// Adagrad: the per-element update, shared by the CPU and CUDA kernels. The
// math follows torch.optim's single-tensor Adagrad (torch/optim/adagrad.py),
// op for op:
//   g   = grad * grad_mul                  (GradScaler unscale, maximize's sign, clip factor)
//   g   = g + l1 * sign(p)                 (l1 != 0: math.h's add_l1)
//   g   = g + wd * p                       (wd != 0)
//   sum = sum + g * g
//   p   = p + (-clr) * g / (sqrt(sum) + eps)
// with clr = lr / (1 + (step - 1) * lr_decay), `step` already advanced.
#pragma once

#include <pyoptim/macros.h>
#include <pyoptim/math.h>

namespace pyoptim {

// One parameter group's hyperparameters, as the op receives them.
struct AdagradHyper {
  double lr;
  double lr_decay;
  double weight_decay;
  double eps;
  double l1_weight_decay;
};

inline namespace PYOPTIM_ISA {  // note [ISA namespaces]

template <typename S>
struct AdagradScalars {
  S grad_mul, weight_decay, neg_clr, eps, l1;
  bool has_weight_decay, has_l1;
};

// Computed in double and rounded once, as torch's Python-side scalars are
// (clr from the float32 step's value, as torch's _get_value(step) reads it).
template <typename S>
PYOPTIM_HOST_DEVICE inline AdagradScalars<S> adagrad_scalars(const AdagradHyper& h, double lr, double step,
                                                             double grad_mul) {
  AdagradScalars<S> s;
  const double clr = lr / (1.0 + (step - 1.0) * h.lr_decay);
  s.grad_mul = static_cast<S>(grad_mul);
  s.weight_decay = static_cast<S>(h.weight_decay);
  s.neg_clr = static_cast<S>(-clr);
  s.eps = static_cast<S>(h.eps);
  s.l1 = static_cast<S>(h.l1_weight_decay);
  s.has_weight_decay = h.weight_decay != 0.0;
  s.has_l1 = h.l1_weight_decay != 0.0;
  return s;
}

// AdagradScalars broadcast to the math type M.
template <typename M>
struct AdagradCoeffs {
  using Ops = MathOps<M>;
  M grad_mul, weight_decay, neg_clr, eps, l1;
  bool has_weight_decay, has_l1;

  template <typename S>
  PYOPTIM_HOST_DEVICE PYOPTIM_INLINE explicit AdagradCoeffs(const AdagradScalars<S>& s)
      : grad_mul(Ops::splat(s.grad_mul)),
        weight_decay(Ops::splat(s.weight_decay)),
        neg_clr(Ops::splat(s.neg_clr)),
        eps(Ops::splat(s.eps)),
        l1(Ops::splat(s.l1)),
        has_weight_decay(s.has_weight_decay),
        has_l1(s.has_l1) {}
};

template <typename M>
PYOPTIM_HOST_DEVICE PYOPTIM_INLINE void adagrad_update(M& p, M g, M& sum, const AdagradCoeffs<M>& c) {
  using Ops = MathOps<M>;
  g = g * c.grad_mul;
  if (c.has_l1) {
    g = add_l1(g, p, c.l1);
  }
  if (c.has_weight_decay) {
    g = g + c.weight_decay * p;
  }
  sum = sum + g * g;
  const M denom = Ops::sqrt(sum) + c.eps;
  p = p + c.neg_clr * g / denom;
}

}  // namespace PYOPTIM_ISA
}  // namespace pyoptim
