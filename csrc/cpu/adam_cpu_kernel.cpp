// The CPU Adam kernel. setup.py builds this file once per instruction set
// (with CPU_CAPABILITY set to DEFAULT, AVX2 or AVX512 and the matching -m
// flags); adam_cpu.cpp calls the one the running CPU supports.
#include <cstring>
#include <optional>

#include <ATen/OpMathType.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <pyoptim/adam.h>

#include "adam_cpu.h"
#include "multi_tensor_cpu.h"
#include "precision_cpu.h"
#include "vec_math.h"

#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif

namespace pyoptim::cpu::CPU_CAPABILITY {

namespace {

// The arrays of one Adam element: p, g, m, v, max_v.
template <typename S, bool AMSGRAD, bool DECOUPLED>
struct AdamOp {
  static constexpr unsigned kLoad = AMSGRAD ? 0b11111u : 0b01111u;
  static constexpr unsigned kStore = AMSGRAD ? 0b11101u : 0b01101u;  // never g
  VecAndScalar<AdamCoeffs, S> coeffs;

  template <typename M>
  void operator()(M (&x)[5]) const {
    adam_update<AMSGRAD, DECOUPLED>(x[0], x[1], x[2], x[3], x[4], coeffs.get(static_cast<const M*>(nullptr)));
  }
};

// Consecutive tensors of one group at one step share their coefficients:
// each thread computes them (two pow() calls) once per such run, which is
// most of the per-tensor cost of a step over thousands of tiny tensors.
struct AdamCoeffKey {
  AdamHyper hyper;
  double lr, step, grad_mul;
  bool operator==(const AdamCoeffKey& o) const {
    return std::memcmp(this, &o, sizeof(AdamCoeffKey)) == 0;
  }
};

template <typename Op>
struct AdamCoeffCache {
  AdamCoeffKey key{};
  std::optional<Op> op;
};

// This thread's cache, through a call the compiler cannot see into: inlined,
// GCC rematerialized the thread_local's address (a __tls_get_addr call, with
// the vzeroupper and ymm spills around it) inside the vector loop that reads
// the coefficients, and the step ran at half of torch's speed on one large
// tensor (37 against 21 ms for 16M floats on one thread).
template <typename Op>
__attribute__((noinline)) AdamCoeffCache<Op>& adam_coeff_cache() {
  thread_local AdamCoeffCache<Op> cache;  // one TLS lookup per run of tensors, not per vector
  return cache;
}

template <typename T, bool AMSGRAD, bool DECOUPLED>
void adam_all(const AdamCpuLaunch& L) {
  using S = at::opmath_type<T>;
  using Op = AdamOp<S, AMSGRAD, DECOUPLED>;
  // One parallel region over every tensor's chunks (not one per tensor): the
  // per-tensor fork/join is what holds torch's CPU foreach/fused paths to a
  // third of the bandwidth on many small tensors.
  parallel_chunks(L.plan, kAdamCpuChunk, L.numel.data(), [&](int64_t i, int64_t begin, int64_t end) {
    AdamCoeffCache<Op>& cache = adam_coeff_cache<Op>();
    const AdamCoeffKey key{L.hyper[i], L.lr[i], L.step[i], L.grad_mul};
    if (!cache.op.has_value() || !(key == cache.key)) {
      cache.op.emplace(Op{VecAndScalar<AdamCoeffs, S>(adam_scalars<S>(L.hyper[i], L.lr[i], L.step[i], L.grad_mul))});
      cache.key = key;
    }
    const Op& op = *cache.op;
    prefetch_next(i, L.p, L.g, L.m, L.v);
    T* const ptr[5] = {static_cast<T*>(L.p[i]), static_cast<T*>(const_cast<void*>(L.g[i])),
                       static_cast<T*>(L.m[i]), static_cast<T*>(L.v[i]),
                       AMSGRAD ? static_cast<T*>(L.vm[i]) : nullptr};
    elementwise_range<T, 5, Op::kLoad, Op::kStore>(ptr, begin, end, op);
  });
}

// The precision path (note [precision policy] in pyoptim/optim/_base.py):
// params of storage type T, state (m, v, max_v) of storage type U, through
// precision_cpu.h's loop.
template <typename T, typename U, bool AMSGRAD, bool DECOUPLED>
void adam_mixed(const AdamCpuLaunch& L) {
  using V = at::vec::Vectorized<float>;
  constexpr unsigned kState = AMSGRAD ? 0b111u : 0b011u;
  parallel_chunks(L.plan, kAdamCpuChunk, L.numel.data(), [&](int64_t i, int64_t begin, int64_t end) {
    prefetch_next(i, L.p, L.g, L.m, L.v, L.extra);
    const AdamCoeffs<V> c(adam_scalars<float>(L.hyper[i], L.lr[i], L.step[i], L.grad_mul));
    U* const state[3] = {static_cast<U*>(L.m[i]), static_cast<U*>(L.v[i]),
                         AMSGRAD ? static_cast<U*>(L.vm[i]) : nullptr};
    precision_range<T, U, 3, kState, kState>(
        L.policy, static_cast<T*>(L.p[i]), static_cast<const T*>(L.g[i]), L.extra[i], L.key[i], state, begin, end,
        [&](V& p, V g, V (&s)[3]) { adam_update<AMSGRAD, DECOUPLED>(p, g, s[0], s[1], s[2], c); });
  });
}

template <typename T, typename U>
void adam_mixed_flags(const AdamCpuLaunch& L) {
  if (L.amsgrad) {
    L.decoupled ? adam_mixed<T, U, true, true>(L) : adam_mixed<T, U, true, false>(L);
  } else {
    L.decoupled ? adam_mixed<T, U, false, true>(L) : adam_mixed<T, U, false, false>(L);
  }
}

template <typename T>
void adam_dispatch_flags(const AdamCpuLaunch& L) {
  if constexpr (!std::is_same_v<T, double>) {
    if (L.policy != MasterWeights::kNone || L.state_dtype != L.dtype) {
      return L.state_dtype == c10::ScalarType::BFloat16 ? adam_mixed_flags<T, c10::BFloat16>(L)
                                                        : adam_mixed_flags<T, float>(L);
    }
  }
  if (L.amsgrad) {
    L.decoupled ? adam_all<T, true, true>(L) : adam_all<T, true, false>(L);
  } else {
    L.decoupled ? adam_all<T, false, true>(L) : adam_all<T, false, false>(L);
  }
}

}  // namespace

void adam_kernel(const AdamCpuLaunch& L) {
  switch (L.dtype) {
    case c10::ScalarType::Float: return adam_dispatch_flags<float>(L);
    case c10::ScalarType::Double: return adam_dispatch_flags<double>(L);
    case c10::ScalarType::Half: return adam_dispatch_flags<c10::Half>(L);
    case c10::ScalarType::BFloat16: return adam_dispatch_flags<c10::BFloat16>(L);
    default: TORCH_INTERNAL_ASSERT(false, "adam_step_cpu: unexpected dtype ", L.dtype);
  }
}

}  // namespace pyoptim::cpu::CPU_CAPABILITY
