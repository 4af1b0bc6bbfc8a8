// Vector norms of many tensors: the per-element term and the reductions,
// shared by the CPU and CUDA kernels.
//   L1: sum |x|     L2: sqrt(sum x^2)     Linf: max |x|     Lp: (sum |x|^p)^(1/p)
// Terms are accumulated per chunk in the math type, chunk partials and
// tensors in double, in a fixed order (deterministic, and accurate at any
// size: torch's CPU norm of 2^28 ones returns 11585 instead of 16384).
#pragma once

#include <cmath>

#include <pyoptim/macros.h>
#include <pyoptim/math.h>

namespace pyoptim {

enum class NormKind : int { L1 = 0, L2 = 1, Linf = 2, Lp = 3 };

inline NormKind norm_kind(double p) {
  if (p == 1.0) {
    return NormKind::L1;
  }
  if (p == 2.0) {
    return NormKind::L2;
  }
  if (std::isinf(p)) {
    return NormKind::Linf;
  }
  return NormKind::Lp;
}

inline namespace PYOPTIM_ISA {  // note [ISA namespaces]

template <NormKind K, typename M>
PYOPTIM_HOST_DEVICE PYOPTIM_INLINE M norm_term(M x, M p) {
  using Ops = MathOps<M>;
  if constexpr (K == NormKind::L2) {
    return x * x;
  } else if constexpr (K == NormKind::Lp) {
    return Ops::pow(Ops::abs(x), p);
  } else {
    return Ops::abs(x);
  }
}

// Combines two partial accumulations (a max for Linf, NaN-propagating).
template <NormKind K, typename M>
PYOPTIM_HOST_DEVICE PYOPTIM_INLINE M norm_combine(M a, M b) {
  if constexpr (K == NormKind::Linf) {
    return MathOps<M>::max(a, b);
  } else {
    return a + b;
  }
}

// The norm from a full accumulation.
template <NormKind K>
PYOPTIM_HOST_DEVICE PYOPTIM_INLINE double norm_finish(double acc, double p) {
  if constexpr (K == NormKind::L2) {
    return ::sqrt(acc);
  } else if constexpr (K == NormKind::Lp) {
    return ::pow(acc, 1.0 / p);
  } else {
    return acc;
  }
}

}  // namespace PYOPTIM_ISA
}  // namespace pyoptim
