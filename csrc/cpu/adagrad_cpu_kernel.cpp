// The CPU Adagrad kernel, built once per instruction set (see cpu_isa.h).
#include <ATen/OpMathType.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <pyoptim/adagrad.h>

#include "adagrad_cpu.h"
#include "multi_tensor_cpu.h"
#include "precision_cpu.h"
#include "vec_math.h"

#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif

namespace pyoptim::cpu::CPU_CAPABILITY {

namespace {

// The arrays of one Adagrad element: p, g, sum.
template <typename S>
struct AdagradOp {
  static constexpr unsigned kLoad = 0b111u;
  static constexpr unsigned kStore = 0b101u;  // never g
  VecAndScalar<AdagradCoeffs, S> coeffs;

  template <typename M>
  void operator()(M (&x)[3]) const {
    adagrad_update(x[0], x[1], x[2], coeffs.get(static_cast<const M*>(nullptr)));
  }
};

template <typename T>
void adagrad_all(const AdagradCpuLaunch& L) {
  using S = at::opmath_type<T>;
  using Op = AdagradOp<S>;
  parallel_chunks(L.plan, kAdagradCpuChunk, L.numel.data(), [&](int64_t i, int64_t begin, int64_t end) {
    const Op op{VecAndScalar<AdagradCoeffs, S>(adagrad_scalars<S>(L.hyper[i], L.lr[i], L.step[i], L.grad_mul))};
    T* const ptr[3] = {static_cast<T*>(L.p[i]), static_cast<T*>(const_cast<void*>(L.g[i])),
                       static_cast<T*>(L.sum[i])};
    elementwise_range<T, 3, Op::kLoad, Op::kStore>(ptr, begin, end, op);
  });
}

// The precision path (note [precision policy] in pyoptim/optim/_base.py): params of storage type T, sum of
// storage type U, through precision_cpu.h's loop.
template <typename T, typename U>
void adagrad_mixed(const AdagradCpuLaunch& L) {
  using V = at::vec::Vectorized<float>;
  parallel_chunks(L.plan, kAdagradCpuChunk, L.numel.data(), [&](int64_t i, int64_t begin, int64_t end) {
    const AdagradCoeffs<V> c(adagrad_scalars<float>(L.hyper[i], L.lr[i], L.step[i], L.grad_mul));
    U* const state[1] = {static_cast<U*>(L.sum[i])};
    precision_range<T, U, 1, 0b1u, 0b1u>(L.policy, static_cast<T*>(L.p[i]), static_cast<const T*>(L.g[i]),
                                         L.extra[i], L.key[i], state, begin, end,
                                         [&](V& p, V g, V (&s)[1]) { adagrad_update(p, g, s[0], c); });
  });
}

template <typename T>
void adagrad_dispatch(const AdagradCpuLaunch& L) {
  if constexpr (!std::is_same_v<T, double>) {
    if (L.policy != MasterWeights::kNone || L.state_dtype != L.dtype) {
      return L.state_dtype == c10::ScalarType::BFloat16 ? adagrad_mixed<T, c10::BFloat16>(L)
                                                        : adagrad_mixed<T, float>(L);
    }
  }
  adagrad_all<T>(L);
}

}  // namespace

void adagrad_kernel(const AdagradCpuLaunch& L) {
  switch (L.dtype) {
    case c10::ScalarType::Float: return adagrad_dispatch<float>(L);
    case c10::ScalarType::Double: return adagrad_dispatch<double>(L);
    case c10::ScalarType::Half: return adagrad_dispatch<c10::Half>(L);
    case c10::ScalarType::BFloat16: return adagrad_dispatch<c10::BFloat16>(L);
    default: TORCH_INTERNAL_ASSERT(false, "adagrad_step_cpu: unexpected dtype ", L.dtype);
  }
}

}  // namespace pyoptim::cpu::CPU_CAPABILITY
