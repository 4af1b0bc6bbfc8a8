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
};

}  // namespace PYOPTIM_ISA
}  // namespace pyoptim
