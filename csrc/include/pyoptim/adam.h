// Adam / AdamW: the per-element update, shared by the CPU and CUDA kernels.
//
// The math follows torch.optim's single-tensor Adam (torch/optim/adam.py),
// op for op, so that fp32 results track torch's foreach=False path:
//   g  = grad * grad_mul                       (GradScaler unscale, maximize's sign, clip factor)
//   g  = g + l1 * sign(p)                      (l1 != 0: math.h's add_l1)
//   p  = p * (1 - lr * wd)                     (AdamW, wd != 0)
//   g  = g + wd * p                            (Adam, wd != 0)
//   m  = lerp(m, g, 1 - beta1)
//   v  = v * beta2 + (1 - beta2) * g * g
//   vm = max(vm, v)                            (amsgrad)
//   p  = p + (-lr / bc1) * m / (sqrt(v or vm) / sqrt(bc2) + eps)
// with bc1 = 1 - beta1^step and bc2 = 1 - beta2^step, `step` already advanced.
#pragma once

#include <cmath>

#include <pyoptim/macros.h>
#include <pyoptim/math.h>

namespace pyoptim {

// One parameter group's hyperparameters, as the op receives them.
struct AdamHyper {
  double lr;
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
  double l1_weight_decay = 0.0;
};

inline namespace PYOPTIM_ISA {  // note [ISA namespaces]

// Everything the per-element update needs for one tensor, in scalar type S
// (the math type: float for fp32/fp16/bf16 storage, double for fp64).
// Computed in double and rounded once, as torch's Python-side scalars are.
template <typename S>
struct AdamScalars {
  S grad_mul;        // inv_grad_scale * (maximize ? -1 : 1) * clip_coef
  S decay;           // AdamW: 1 - lr * wd
  S weight_decay;    // Adam: wd
  S m_weight;        // 1 - beta1 (lerp weight)
  S m_weight_comp;   // 1 - weight, in S
  S beta2;
  S one_minus_beta2;
  S neg_step_size;   // -lr / bc1
  S bc2_sqrt;        // sqrt(bc2)
  S eps;
  S l1;             // l1_weight_decay
  bool has_weight_decay;
  bool has_l1;
  bool lerp_low;     // m_weight < 0.5: which side of torch.lerp's formula
};

template <typename S>
PYOPTIM_HOST_DEVICE inline AdamScalars<S> adam_scalars(
    const AdamHyper& h, double lr, double step, double grad_mul) {
  AdamScalars<S> s;
  const double bc1 = 1.0 - ::pow(h.beta1, step);
  const double bc2 = 1.0 - ::pow(h.beta2, step);
  s.grad_mul = static_cast<S>(grad_mul);
  s.decay = static_cast<S>(1.0 - lr * h.weight_decay);
  s.weight_decay = static_cast<S>(h.weight_decay);
  // torch.lerp gets the weight as a scalar rounded to S, and picks its
  // formula and computes 1 - weight from that rounded value.
  s.m_weight = static_cast<S>(1.0 - h.beta1);
  s.m_weight_comp = S(1) - s.m_weight;
  s.beta2 = static_cast<S>(h.beta2);
  s.one_minus_beta2 = static_cast<S>(1.0 - h.beta2);
  s.neg_step_size = static_cast<S>(-(lr / bc1));
  s.bc2_sqrt = static_cast<S>(::sqrt(bc2));
  s.eps = static_cast<S>(h.eps);
  s.l1 = static_cast<S>(h.l1_weight_decay);
  s.has_weight_decay = h.weight_decay != 0.0;
  s.has_l1 = h.l1_weight_decay != 0.0;
  s.lerp_low = s.m_weight < S(0.5);
  return s;
}

// AdamScalars broadcast to the math type M (a no-op for scalar M; for
// at::vec::Vectorized it fills the vector registers once per chunk).
template <typename M>
struct AdamCoeffs {
  using Ops = MathOps<M>;
  M grad_mul, decay, weight_decay, m_weight, m_weight_comp, beta2, one_minus_beta2,
      neg_step_size, bc2_sqrt, eps, l1;
  bool has_weight_decay, has_l1, lerp_low;

  template <typename S>
  PYOPTIM_HOST_DEVICE PYOPTIM_INLINE explicit AdamCoeffs(const AdamScalars<S>& s)
      : grad_mul(Ops::splat(s.grad_mul)),
        decay(Ops::splat(s.decay)),
        weight_decay(Ops::splat(s.weight_decay)),
        m_weight(Ops::splat(s.m_weight)),
        m_weight_comp(Ops::splat(s.m_weight_comp)),
        beta2(Ops::splat(s.beta2)),
        one_minus_beta2(Ops::splat(s.one_minus_beta2)),
        neg_step_size(Ops::splat(s.neg_step_size)),
        bc2_sqrt(Ops::splat(s.bc2_sqrt)),
        eps(Ops::splat(s.eps)),
        l1(Ops::splat(s.l1)),
        has_weight_decay(s.has_weight_decay),
        has_l1(s.has_l1),
        lerp_low(s.lerp_low) {}
};

// The update of one element (or one vector of elements). `vmax` is read and
// written only when AMSGRAD.
template <bool AMSGRAD, bool DECOUPLED, typename M>
PYOPTIM_HOST_DEVICE PYOPTIM_INLINE void adam_update(
    M& p, M g, M& m, M& v, M& vmax, const AdamCoeffs<M>& c) {
  using Ops = MathOps<M>;
  g = g * c.grad_mul;
  if (c.has_l1) {
    g = add_l1(g, p, c.l1);
  }
  if (c.has_weight_decay) {
    if (DECOUPLED) {
      p = p * c.decay;
    } else {
      g = g + c.weight_decay * p;
    }
  }
  m = lerp(m, g, c.m_weight, c.m_weight_comp, c.lerp_low);
  v = v * c.beta2 + c.one_minus_beta2 * g * g;
  M second = v;
  if (AMSGRAD) {
    vmax = Ops::max(vmax, v);
    second = vmax;
  }
  const M denom = Ops::sqrt(second) / c.bc2_sqrt + c.eps;
  p = p + c.neg_step_size * m / denom;
}

}  // namespace PYOPTIM_ISA
}  // namespace pyoptim
