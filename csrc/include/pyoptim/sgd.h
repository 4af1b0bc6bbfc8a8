// SGD with momentum: the per-element update, shared by the CPU and CUDA
// kernels. The math follows torch.optim's single-tensor SGD
// (torch/optim/sgd.py), op for op:
//   g   = grad * grad_mul                 (GradScaler unscale, maximize's sign, clip factor)
//   g   = g + l1 * sign(p)                (l1 != 0: math.h's add_l1)
//   g   = g + wd * p                      (wd != 0)
//   buf = g                               (momentum, first step: torch clones the grad)
//   buf = buf * momentum + (1 - dampening) * g   (momentum, later steps)
//   g   = nesterov ? g + momentum * buf : buf    (momentum)
//   p   = p + (-lr) * g
#pragma once

#include <pyoptim/macros.h>
#include <pyoptim/math.h>

namespace pyoptim {

// One parameter group's hyperparameters, as the op receives them.
struct SgdHyper {
  double lr;
  double momentum;
  double dampening;
  double weight_decay;
  double l1_weight_decay = 0.0;
};

inline namespace PYOPTIM_ISA {  // note [ISA namespaces]

template <typename S>
struct SgdScalars {
  S grad_mul, weight_decay, momentum, one_minus_dampening, neg_lr, l1;
  bool has_weight_decay, has_l1;
};

template <typename S>
PYOPTIM_HOST_DEVICE inline SgdScalars<S> sgd_scalars(const SgdHyper& h, double lr, double grad_mul) {
  SgdScalars<S> s;
  s.grad_mul = static_cast<S>(grad_mul);
  s.weight_decay = static_cast<S>(h.weight_decay);
  s.momentum = static_cast<S>(h.momentum);
  s.one_minus_dampening = static_cast<S>(1.0 - h.dampening);
  s.neg_lr = static_cast<S>(-lr);
  s.l1 = static_cast<S>(h.l1_weight_decay);
  s.has_weight_decay = h.weight_decay != 0.0;
  s.has_l1 = h.l1_weight_decay != 0.0;
  return s;
}

template <typename M>
struct SgdCoeffs {
  using Ops = MathOps<M>;
  M grad_mul, weight_decay, momentum, one_minus_dampening, neg_lr, l1;
  bool has_weight_decay, has_l1;

  template <typename S>
  PYOPTIM_HOST_DEVICE PYOPTIM_INLINE explicit SgdCoeffs(const SgdScalars<S>& s)
      : grad_mul(Ops::splat(s.grad_mul)),
        weight_decay(Ops::splat(s.weight_decay)),
        momentum(Ops::splat(s.momentum)),
        one_minus_dampening(Ops::splat(s.one_minus_dampening)),
        neg_lr(Ops::splat(s.neg_lr)),
        l1(Ops::splat(s.l1)),
        has_weight_decay(s.has_weight_decay),
        has_l1(s.has_l1) {}
};

// `buf` is read and written only when MOMENTUM (and read only after the first
// step).
template <bool MOMENTUM, bool NESTEROV, bool FIRST_STEP, typename M>
PYOPTIM_HOST_DEVICE PYOPTIM_INLINE void sgd_update(M& p, M g, M& buf, const SgdCoeffs<M>& c) {
  g = g * c.grad_mul;
  if (c.has_l1) {
    g = add_l1(g, p, c.l1);
  }
  if (c.has_weight_decay) {
    g = g + c.weight_decay * p;
  }
  if (MOMENTUM) {
    if (FIRST_STEP) {
      buf = g;
    } else {
      buf = buf * c.momentum + c.one_minus_dampening * g;
    }
    g = NESTEROV ? g + c.momentum * buf : buf;
  }
  p = p + c.neg_lr * g;
}

}  // namespace PYOPTIM_ISA
}  // namespace pyoptim
