// The CPU SGD kernel, built once per instruction set (see cpu_isa.h).
#include <ATen/OpMathType.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <pyoptim/sgd.h>

#include "multi_tensor_cpu.h"
#include "precision_cpu.h"
#include "sgd_cpu.h"
#include "vec_math.h"

#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif

namespace pyoptim::cpu::CPU_CAPABILITY {

namespace {

// The arrays of one SGD element: p, g, momentum buffer.
template <typename S, bool MOMENTUM, bool NESTEROV, bool FIRST_STEP>
struct SgdOp {
  static constexpr unsigned kLoad = MOMENTUM && !FIRST_STEP ? 0b111u : 0b011u;
  static constexpr unsigned kStore = MOMENTUM ? 0b101u : 0b001u;  // never g
  VecAndScalar<SgdCoeffs, S> coeffs;

  template <typename M>
  void operator()(M (&x)[3]) const {
    sgd_update<MOMENTUM, NESTEROV, FIRST_STEP>(x[0], x[1], x[2], coeffs.get(static_cast<const M*>(nullptr)));
  }
};

template <typename T, bool MOMENTUM, bool NESTEROV, bool FIRST_STEP>
void sgd_all(const SgdCpuLaunch& L) {
  using S = at::opmath_type<T>;
  using Op = SgdOp<S, MOMENTUM, NESTEROV, FIRST_STEP>;
  parallel_chunks(L.plan, kSgdCpuChunk, L.numel.data(), [&](int64_t i, int64_t begin, int64_t end) {
    prefetch_next(i, L.p, L.g, L.buf);
    const Op op{VecAndScalar<SgdCoeffs, S>(sgd_scalars<S>(L.hyper[i], L.lr[i], L.grad_mul))};
    T* const ptr[3] = {static_cast<T*>(L.p[i]), static_cast<T*>(const_cast<void*>(L.g[i])),
                       MOMENTUM ? static_cast<T*>(L.buf[i]) : nullptr};
    elementwise_range<T, 3, Op::kLoad, Op::kStore>(ptr, begin, end, op);
  });
}

// The precision path (note [precision policy] in pyoptim/optim/_base.py): params of storage type T, the
// momentum buffer of storage type U, through precision_cpu.h's loop.
template <typename T, typename U, bool MOMENTUM, bool NESTEROV, bool FIRST_STEP>
void sgd_mixed(const SgdCpuLaunch& L) {
  using V = at::vec::Vectorized<float>;
  constexpr unsigned kLoad = MOMENTUM && !FIRST_STEP ? 0b1u : 0b0u;
  constexpr unsigned kStore = MOMENTUM ? 0b1u : 0b0u;
  parallel_chunks(L.plan, kSgdCpuChunk, L.numel.data(), [&](int64_t i, int64_t begin, int64_t end) {
    prefetch_next(i, L.p, L.g, L.buf, L.extra);
    const SgdCoeffs<V> c(sgd_scalars<float>(L.hyper[i], L.lr[i], L.grad_mul));
    U* const state[1] = {MOMENTUM ? static_cast<U*>(L.buf[i]) : nullptr};
    precision_range<T, U, 1, kLoad, kStore>(
        L.policy, static_cast<T*>(L.p[i]), static_cast<const T*>(L.g[i]), L.extra[i], L.key[i], state, begin, end,
        [&](V& p, V g, V (&s)[1]) { sgd_update<MOMENTUM, NESTEROV, FIRST_STEP>(p, g, s[0], c); });
  });
}

template <typename T, typename U>
void sgd_mixed_flags(const SgdCpuLaunch& L) {
  if (!L.momentum) {
    return sgd_mixed<T, U, false, false, false>(L);
  }
  if (L.first_step) {
    return L.nesterov ? sgd_mixed<T, U, true, true, true>(L) : sgd_mixed<T, U, true, false, true>(L);
  }
  return L.nesterov ? sgd_mixed<T, U, true, true, false>(L) : sgd_mixed<T, U, true, false, false>(L);
}

template <typename T>
void sgd_dispatch_flags(const SgdCpuLaunch& L) {
  if constexpr (!std::is_same_v<T, double>) {
    if (L.policy != MasterWeights::kNone || L.state_dtype != L.dtype) {
      return L.state_dtype == c10::ScalarType::BFloat16 ? sgd_mixed_flags<T, c10::BFloat16>(L)
                                                        : sgd_mixed_flags<T, float>(L);
    }
  }
  if (!L.momentum) {
    return sgd_all<T, false, false, false>(L);
  }
  if (L.first_step) {
    return L.nesterov ? sgd_all<T, true, true, true>(L) : sgd_all<T, true, false, true>(L);
  }
  return L.nesterov ? sgd_all<T, true, true, false>(L) : sgd_all<T, true, false, false>(L);
}

}  // namespace

void sgd_kernel(const SgdCpuLaunch& L) {
  switch (L.dtype) {
    case c10::ScalarType::Float: return sgd_dispatch_flags<float>(L);
    case c10::ScalarType::Double: return sgd_dispatch_flags<double>(L);
    case c10::ScalarType::Half: return sgd_dispatch_flags<c10::Half>(L);
    case c10::ScalarType::BFloat16: return sgd_dispatch_flags<c10::BFloat16>(L);
    default: TORCH_INTERNAL_ASSERT(false, "sgd_step_cpu: unexpected dtype ", L.dtype);
  }
}

}  // namespace pyoptim::cpu::CPU_CAPABILITY
