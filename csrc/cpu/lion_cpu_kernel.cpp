// The CPU Lion kernel, built once per instruction set (see cpu_isa.h).
#include <ATen/OpMathType.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <pyoptim/lion.h>

#include "lion_cpu.h"
#include "multi_tensor_cpu.h"
#include "precision_cpu.h"
#include "vec_math.h"

#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif

namespace pyoptim::cpu::CPU_CAPABILITY {

namespace {

// The arrays of one Lion element: p, g, m.
template <typename S>
struct LionOp {
  static constexpr unsigned kLoad = 0b111u;
  static constexpr unsigned kStore = 0b101u;  // never g
  VecAndScalar<LionCoeffs, S> coeffs;

  template <typename M>
  void operator()(M (&x)[3]) const {
    lion_update(x[0], x[1], x[2], coeffs.get(static_cast<const M*>(nullptr)));
  }
};

template <typename T>
void lion_all(const LionCpuLaunch& L) {
  using S = at::opmath_type<T>;
  using Op = LionOp<S>;
  parallel_chunks(L.plan, kLionCpuChunk, L.numel.data(), [&](int64_t i, int64_t begin, int64_t end) {
    const Op op{VecAndScalar<LionCoeffs, S>(lion_scalars<S>(L.hyper[i], L.lr[i], L.grad_mul))};
    T* const ptr[3] = {static_cast<T*>(L.p[i]), static_cast<T*>(const_cast<void*>(L.g[i])),
                       static_cast<T*>(L.m[i])};
    elementwise_range<T, 3, Op::kLoad, Op::kStore>(ptr, begin, end, op);
  });
}

// The precision path (note [precision policy] in pyoptim/optim/_base.py): params of storage type T, exp_avg of
// storage type U, through precision_cpu.h's loop.
template <typename T, typename U>
void lion_mixed(const LionCpuLaunch& L) {
  using V = at::vec::Vectorized<float>;
  parallel_chunks(L.plan, kLionCpuChunk, L.numel.data(), [&](int64_t i, int64_t begin, int64_t end) {
    const LionCoeffs<V> c(lion_scalars<float>(L.hyper[i], L.lr[i], L.grad_mul));
    U* const state[1] = {static_cast<U*>(L.m[i])};
    precision_range<T, U, 1, 0b1u, 0b1u>(L.policy, static_cast<T*>(L.p[i]), static_cast<const T*>(L.g[i]),
                                         L.extra[i], L.key[i], state, begin, end,
                                         [&](V& p, V g, V (&s)[1]) { lion_update(p, g, s[0], c); });
  });
}

template <typename T>
void lion_dispatch(const LionCpuLaunch& L) {
  if constexpr (!std::is_same_v<T, double>) {
    if (L.policy != MasterWeights::kNone || L.state_dtype != L.dtype) {
      return L.state_dtype == c10::ScalarType::BFloat16 ? lion_mixed<T, c10::BFloat16>(L) : lion_mixed<T, float>(L);
    }
  }
  lion_all<T>(L);
}

}  // namespace

void lion_kernel(const LionCpuLaunch& L) {
  switch (L.dtype) {
    case c10::ScalarType::Float: return lion_dispatch<float>(L);
    case c10::ScalarType::Double: return lion_dispatch<double>(L);
    case c10::ScalarType::Half: return lion_dispatch<c10::Half>(L);
    case c10::ScalarType::BFloat16: return lion_dispatch<c10::BFloat16>(L);
    default: TORCH_INTERNAL_ASSERT(false, "lion_step_cpu: unexpected dtype ", L.dtype);
  }
}

}  // namespace pyoptim::cpu::CPU_CAPABILITY
