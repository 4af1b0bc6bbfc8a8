// The CPU RMSprop kernel, built once per instruction set (see cpu_isa.h).
#include <ATen/OpMathType.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <pyoptim/rmsprop.h>

#include "multi_tensor_cpu.h"
#include "precision_cpu.h"
#include "rmsprop_cpu.h"
#include "vec_math.h"

#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif

namespace pyoptim::cpu::CPU_CAPABILITY {

namespace {

// The arrays of one RMSprop element: p, g, square_avg, grad_avg, momentum_buffer.
template <typename S, bool CENTERED, bool MOMENTUM>
struct RmspropOp {
  static constexpr unsigned kOptional = (CENTERED ? 0b01000u : 0u) | (MOMENTUM ? 0b10000u : 0u);
  static constexpr unsigned kLoad = 0b00111u | kOptional;
  static constexpr unsigned kStore = 0b00101u | kOptional;  // never g
  VecAndScalar<RmspropCoeffs, S> coeffs;

  template <typename M>
  void operator()(M (&x)[5]) const {
    rmsprop_update<CENTERED, MOMENTUM>(x[0], x[1], x[2], x[3], x[4], coeffs.get(static_cast<const M*>(nullptr)));
  }
};

template <typename T, bool CENTERED, bool MOMENTUM>
void rmsprop_all(const RmspropCpuLaunch& L) {
  using S = at::opmath_type<T>;
  using Op = RmspropOp<S, CENTERED, MOMENTUM>;
  parallel_chunks(L.plan, kRmspropCpuChunk, L.numel.data(), [&](int64_t i, int64_t begin, int64_t end) {
    const Op op{VecAndScalar<RmspropCoeffs, S>(rmsprop_scalars<S>(L.hyper[i], L.lr[i], L.grad_mul))};
    T* const ptr[5] = {static_cast<T*>(L.p[i]), static_cast<T*>(const_cast<void*>(L.g[i])),
                       static_cast<T*>(L.sa[i]), CENTERED ? static_cast<T*>(L.ga[i]) : nullptr,
                       MOMENTUM ? static_cast<T*>(L.buf[i]) : nullptr};
    elementwise_range<T, 5, Op::kLoad, Op::kStore>(ptr, begin, end, op);
  });
}

// The precision path (note [precision policy] in pyoptim/optim/_base.py): params of storage type T, the state
// (square_avg, grad_avg, momentum_buffer) of storage type U, through precision_cpu.h's loop.
template <typename T, typename U, bool CENTERED, bool MOMENTUM>
void rmsprop_mixed(const RmspropCpuLaunch& L) {
  using V = at::vec::Vectorized<float>;
  constexpr unsigned kState = 0b001u | (CENTERED ? 0b010u : 0u) | (MOMENTUM ? 0b100u : 0u);
  parallel_chunks(L.plan, kRmspropCpuChunk, L.numel.data(), [&](int64_t i, int64_t begin, int64_t end) {
    const RmspropCoeffs<V> c(rmsprop_scalars<float>(L.hyper[i], L.lr[i], L.grad_mul));
    U* const state[3] = {static_cast<U*>(L.sa[i]), CENTERED ? static_cast<U*>(L.ga[i]) : nullptr,
                         MOMENTUM ? static_cast<U*>(L.buf[i]) : nullptr};
    precision_range<T, U, 3, kState, kState>(
        L.policy, static_cast<T*>(L.p[i]), static_cast<const T*>(L.g[i]), L.extra[i], L.key[i], state, begin, end,
        [&](V& p, V g, V (&s)[3]) { rmsprop_update<CENTERED, MOMENTUM>(p, g, s[0], s[1], s[2], c); });
  });
}

template <typename T, typename U>
void rmsprop_mixed_flags(const RmspropCpuLaunch& L) {
  if (L.centered) {
    L.momentum ? rmsprop_mixed<T, U, true, true>(L) : rmsprop_mixed<T, U, true, false>(L);
  } else {
    L.momentum ? rmsprop_mixed<T, U, false, true>(L) : rmsprop_mixed<T, U, false, false>(L);
  }
}

template <typename T>
void rmsprop_dispatch_flags(const RmspropCpuLaunch& L) {
  if constexpr (!std::is_same_v<T, double>) {
    if (L.policy != MasterWeights::kNone || L.state_dtype != L.dtype) {
      return L.state_dtype == c10::ScalarType::BFloat16 ? rmsprop_mixed_flags<T, c10::BFloat16>(L)
                                                        : rmsprop_mixed_flags<T, float>(L);
    }
  }
  if (L.centered) {
    L.momentum ? rmsprop_all<T, true, true>(L) : rmsprop_all<T, true, false>(L);
  } else {
    L.momentum ? rmsprop_all<T, false, true>(L) : rmsprop_all<T, false, false>(L);
  }
}

}  // namespace

void rmsprop_kernel(const RmspropCpuLaunch& L) {
  switch (L.dtype) {
    case c10::ScalarType::Float: return rmsprop_dispatch_flags<float>(L);
    case c10::ScalarType::Double: return rmsprop_dispatch_flags<double>(L);
    case c10::ScalarType::Half: return rmsprop_dispatch_flags<c10::Half>(L);
    case c10::ScalarType::BFloat16: return rmsprop_dispatch_flags<c10::BFloat16>(L);
    default: TORCH_INTERNAL_ASSERT(false, "rmsprop_step_cpu: unexpected dtype ", L.dtype);
  }
}

}  // namespace pyoptim::cpu::CPU_CAPABILITY
