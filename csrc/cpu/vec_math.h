// MathOps for at::vec::Vectorized, so the shared per-element math in
// csrc/include/pyoptim runs on CPU vector registers.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <pyoptim/math.h>

namespace pyoptim {
inline namespace PYOPTIM_ISA {  // note [ISA namespaces]

template <typename S>
struct MathOps<at::vec::Vectorized<S>> {
  using scalar = S;
  using V = at::vec::Vectorized<S>;
  static PYOPTIM_INLINE V splat(S x) { return V(x); }
  static PYOPTIM_INLINE V sqrt(const V& x) { return x.sqrt(); }
  static PYOPTIM_INLINE V abs(const V& x) { return x.abs(); }
  static PYOPTIM_INLINE V pow(const V& x, const V& y) { return x.pow(y); }
  static PYOPTIM_INLINE V max(const V& a, const V& b) { return at::vec::maximum(a, b); }
  // torch.sign: -1, 0 or 1, NaN kept (blend 1 where x > 0, -1 where x < 0, else x itself).
  static PYOPTIM_INLINE V sign(const V& x) {
    const V zero(S(0));
    const V pos = V::blendv(x, V(S(1)), x > zero);
    return V::blendv(pos, V(S(-1)), x < zero);
  }
};

}  // namespace PYOPTIM_ISA
}  // namespace pyoptim
