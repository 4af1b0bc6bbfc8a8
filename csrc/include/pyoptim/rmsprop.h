// RMSprop: the per-element update, shared by the CPU and CUDA kernels. The
// math follows torch.optim's single-tensor RMSprop (torch/optim/rmsprop.py),
// op for op:
//   g   = grad * grad_mul                     (GradScaler unscale, maximize's sign, clip factor)
//   g   = g + l1 * sign(p)                    (l1 != 0: math.h's add_l1)
//   g   = g + wd * p                          (wd != 0)
//   sa  = sa * alpha + (1 - alpha) * g * g
//   ga  = lerp(ga, g, 1 - alpha)              (centered)
//   avg = sqrt(sa - ga * ga) + eps            (centered; else sqrt(sa) + eps)
//   buf = buf * momentum + g / avg            (momentum buffers given)
//   p   = p + (-lr) * buf                     (momentum buffers given; else p + (-lr) * g / avg)
// RMSprop's step count advances but enters no formula.
#pragma once

#include <pyoptim/macros.h>
#include <pyoptim/math.h>

namespace pyoptim {

// One parameter group's hyperparameters, as the op receives them.
struct RmspropHyper {
  double lr;
  double alpha;
  double eps;
  double weight_decay;
  double momentum;
  double l1_weight_decay;
};

inline namespace PYOPTIM_ISA {  // note [ISA namespaces]

template <typename S>
struct RmspropScalars {
  S grad_mul, weight_decay, alpha;
  S one_minus_alpha;       // addcmul's value and lerp's weight, 1 - alpha rounded to S
  S one_minus_alpha_comp;  // 1 - that weight, in S
  S eps, momentum, neg_lr, l1;
  bool has_weight_decay, has_l1;
  bool lerp_low;  // |weight| < 0.5: which side of torch.lerp's formula
};

// Computed in double and rounded once, as torch's Python-side scalars are.
template <typename S>
PYOPTIM_HOST_DEVICE inline RmspropScalars<S> rmsprop_scalars(const RmspropHyper& h, double lr, double grad_mul) {
  RmspropScalars<S> s;
  s.grad_mul = static_cast<S>(grad_mul);
  s.weight_decay = static_cast<S>(h.weight_decay);
  s.alpha = static_cast<S>(h.alpha);
  s.one_minus_alpha = static_cast<S>(1.0 - h.alpha);
  s.one_minus_alpha_comp = S(1) - s.one_minus_alpha;
  s.eps = static_cast<S>(h.eps);
  s.momentum = static_cast<S>(h.momentum);
  s.neg_lr = static_cast<S>(-lr);
  s.l1 = static_cast<S>(h.l1_weight_decay);
  s.has_weight_decay = h.weight_decay != 0.0;
  s.has_l1 = h.l1_weight_decay != 0.0;
  // torch.lerp picks its formula from the rounded weight's magnitude (alpha may exceed 1).
  s.lerp_low = s.one_minus_alpha < S(0.5) && s.one_minus_alpha > S(-0.5);
  return s;
}

// RmspropScalars broadcast to the math type M.
template <typename M>
struct RmspropCoeffs {
  using Ops = MathOps<M>;
  M grad_mul, weight_decay, alpha, one_minus_alpha, one_minus_alpha_comp, eps, momentum, neg_lr, l1;
  bool has_weight_decay, has_l1, lerp_low;

  template <typename S>
  PYOPTIM_HOST_DEVICE PYOPTIM_INLINE explicit RmspropCoeffs(const RmspropScalars<S>& s)
      : grad_mul(Ops::splat(s.grad_mul)),
        weight_decay(Ops::splat(s.weight_decay)),
        alpha(Ops::splat(s.alpha)),
        one_minus_alpha(Ops::splat(s.one_minus_alpha)),
        one_minus_alpha_comp(Ops::splat(s.one_minus_alpha_comp)),
        eps(Ops::splat(s.eps)),
        momentum(Ops::splat(s.momentum)),
        neg_lr(Ops::splat(s.neg_lr)),
        l1(Ops::splat(s.l1)),
        has_weight_decay(s.has_weight_decay),
        has_l1(s.has_l1),
        lerp_low(s.lerp_low) {}
};

// The update of one element (or vector). `ga` is read and written only when
// CENTERED, `buf` only when MOMENTUM.
template <bool CENTERED, bool MOMENTUM, typename M>
PYOPTIM_HOST_DEVICE PYOPTIM_INLINE void rmsprop_update(M& p, M g, M& sa, M& ga, M& buf, const RmspropCoeffs<M>& c) {
  using Ops = MathOps<M>;
  g = g * c.grad_mul;
  if (c.has_l1) {
    g = add_l1(g, p, c.l1);
  }
  if (c.has_weight_decay) {
    g = g + c.weight_decay * p;
  }
  sa = sa * c.alpha + c.one_minus_alpha * g * g;
  M avg;
  if (CENTERED) {
    ga = lerp(ga, g, c.one_minus_alpha, c.one_minus_alpha_comp, c.lerp_low);
    avg = Ops::sqrt(sa - ga * ga);
  } else {
    avg = Ops::sqrt(sa);
  }
  avg = avg + c.eps;
  if (MOMENTUM) {
    buf = buf * c.momentum + g / avg;
    p = p + c.neg_lr * buf;
  } else {
    p = p + c.neg_lr * g / avg;
  }
}

}  // namespace PYOPTIM_ISA
}  // namespace pyoptim
