// The CPU LAMB kernels (lamb.h's two passes), built once per instruction set
// (see cpu_isa.h).
#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include <ATen/OpMathType.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <pyoptim/lamb.h>

#include "lamb_cpu.h"
#include "multi_tensor_cpu.h"
#include "precision_cpu.h"
#include "vec_math.h"

#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif

namespace pyoptim::cpu::CPU_CAPABILITY {

namespace {

// x as stored in T and read back (the identity when T is the math type).
template <typename T, typename S>
S as_stored(S x) {
  return static_cast<S>(static_cast<T>(x));
}

template <typename T, typename S>
at::vec::Vectorized<S> as_stored(const at::vec::Vectorized<S>& x) {
  if constexpr (std::is_same_v<T, S>) {
    return x;
  } else {
    return std::get<0>(at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(x, x)));
  }
}

// The arrays of one LAMB element: p, g, m, v.
// Pass 1: m, v written; p * p and u * u summed into per-lane accumulators
// (one op per chunk, so a chunk's sums are the same whatever thread runs it).
template <typename T, typename S>
struct LambMomentsOp {
  using Vec = at::vec::Vectorized<S>;
  static constexpr unsigned kLoad = 0b1111u;
  static constexpr unsigned kStore = 0b1100u;  // m, v
  VecAndScalar<LambCoeffs, S> coeffs;
  // The chunk's elements (`summed`: those summed so far). The loops call the
  // op in element order, a zero-padded tail vector last: its lanes past the
  // chunk add nothing (their u is 0 / (0 + eps), NaN when eps = 0).
  int64_t count;
  mutable Vec vec_p_sq = Vec(S(0)), vec_u_sq = Vec(S(0));
  mutable S p_sq = S(0), u_sq = S(0);
  mutable int64_t summed = 0;

  void add(const Vec& p, const Vec& u) const {
    const int64_t live = std::min<int64_t>(count - summed, Vec::size());
    summed += live;
    const Vec live_u = live < Vec::size() ? Vec::set(Vec(S(0)), u, live) : u;
    vec_p_sq = vec_p_sq + p * p;
    vec_u_sq = vec_u_sq + live_u * live_u;
  }
  void add(S p, S u) const {
    ++summed;
    p_sq += p * p;
    u_sq += u * u;
  }

  template <typename M>
  void operator()(M (&x)[4]) const {
    const LambCoeffs<M>& c = coeffs.get(static_cast<const M*>(nullptr));
    lamb_moments(x[0], x[1], x[2], x[3], c);
    add(x[0], lamb_direction(x[0], as_stored<T>(x[2]), as_stored<T>(x[3]), c));
  }

  // The chunk's sums, in double.
  void finish(double* out) const {
    S lanes_p[Vec::size()], lanes_u[Vec::size()];
    vec_p_sq.store(lanes_p);
    vec_u_sq.store(lanes_u);
    double sp = p_sq, su = u_sq;
    for (int l = 0; l < Vec::size(); ++l) {
      sp += static_cast<double>(lanes_p[l]);
      su += static_cast<double>(lanes_u[l]);
    }
    out[0] = sp;
    out[1] = su;
  }
};

// Pass 2: p moved along u (recomputed from the new m, v); g is not read.
template <typename S>
struct LambApplyOp {
  static constexpr unsigned kLoad = 0b1101u;
  static constexpr unsigned kStore = 0b0001u;  // p
  VecAndScalar<LambCoeffs, S> coeffs;

  template <typename M>
  void operator()(M (&x)[4]) const {
    lamb_apply(x[0], x[2], x[3], coeffs.get(static_cast<const M*>(nullptr)));
  }
};

template <typename T>
void pointers(const LambCpuLaunch& L, int64_t i, T* (&ptr)[4]) {
  ptr[0] = static_cast<T*>(L.p[i]);
  ptr[1] = static_cast<T*>(const_cast<void*>(L.g[i]));
  ptr[2] = static_cast<T*>(L.m[i]);
  ptr[3] = static_cast<T*>(L.v[i]);
}

template <typename T>
void moments_all(const LambCpuLaunch& L, double* partial) {
  using S = at::opmath_type<T>;
  using Op = LambMomentsOp<T, S>;
  parallel_each_chunk(L.plan, kLambCpuChunk, L.numel.data(), [&](int64_t i, int64_t c, int64_t begin, int64_t end) {
    const Op op{VecAndScalar<LambCoeffs, S>(lamb_scalars<S>(L.hyper[i], L.lr[i], L.step[i], L.grad_mul, 1.0)),
                end - begin};
    T* ptr[4];
    pointers(L, i, ptr);
    elementwise_range<T, 4, Op::kLoad, Op::kStore>(ptr, begin, end, op);
    op.finish(partial + 2 * c);
  });
}

template <typename T>
void apply_all(const LambCpuLaunch& L, const double* ratio) {
  using S = at::opmath_type<T>;
  using Op = LambApplyOp<S>;
  parallel_chunks(L.plan, kLambCpuChunk, L.numel.data(), [&](int64_t i, int64_t begin, int64_t end) {
    const Op op{VecAndScalar<LambCoeffs, S>(lamb_scalars<S>(L.hyper[i], L.lr[i], L.step[i], L.grad_mul, ratio[i]))};
    T* ptr[4];
    pointers(L, i, ptr);
    elementwise_range<T, 4, Op::kLoad, Op::kStore>(ptr, begin, end, op);
  });
}

// The precision path (note [precision policy] in pyoptim/optim/_base.py): params of storage type T, m and v
// of storage type U, the param's fp32 value (its master) read and written through precision_cpu.h's loop. The
// first pass reads the master (weight decay, ||p||) and writes only m and v; the second moves the master.
// The sums run as moments_all<float> runs them (float vectors in order, a zero-padded tail), so an
// "fp32" or "remainder" run's trust ratios, and so its masters, equal an fp32-param run's bit for bit.
template <typename T, typename U>
void moments_mixed(const LambCpuLaunch& L, double* partial) {
  using V = at::vec::Vectorized<float>;
  using Op = LambMomentsOp<U, float>;
  parallel_each_chunk(L.plan, kLambCpuChunk, L.numel.data(), [&](int64_t i, int64_t c, int64_t begin, int64_t end) {
    const Op op{VecAndScalar<LambCoeffs, float>(lamb_scalars<float>(L.hyper[i], L.lr[i], L.step[i], L.grad_mul, 1.0)),
                end - begin};
    U* const state[2] = {static_cast<U*>(L.m[i]), static_cast<U*>(L.v[i])};
    precision_range<T, U, 2, 0b11u, 0b11u, /*PSTORE=*/false>(
        L.policy, static_cast<T*>(L.p[i]), static_cast<const T*>(L.g[i]), L.extra[i], L.key[i], state, begin, end,
        [&](V& p, V g, V (&s)[2]) {
          V x[4] = {p, g, s[0], s[1]};
          op(x);
          s[0] = x[2];
          s[1] = x[3];
        });
    op.finish(partial + 2 * c);
  });
}

template <typename T, typename U>
void apply_mixed(const LambCpuLaunch& L, const double* ratio) {
  using V = at::vec::Vectorized<float>;
  parallel_chunks(L.plan, kLambCpuChunk, L.numel.data(), [&](int64_t i, int64_t begin, int64_t end) {
    const LambCoeffs<V> c(lamb_scalars<float>(L.hyper[i], L.lr[i], L.step[i], L.grad_mul, ratio[i]));
    U* const state[2] = {static_cast<U*>(L.m[i]), static_cast<U*>(L.v[i])};
    precision_range<T, U, 2, 0b11u, 0b00u>(L.policy, static_cast<T*>(L.p[i]), static_cast<const T*>(L.g[i]),
                                           L.extra[i], L.key[i], state, begin, end,
                                           [&](V& p, V, V (&s)[2]) { lamb_apply(p, s[0], s[1], c); });
  });
}

// Calls fn(T(), U()) for the launch's storage types when it takes the precision path; returns false otherwise.
template <typename Fn>
bool dispatch_mixed(const LambCpuLaunch& L, const Fn& fn) {
  if ((L.policy == MasterWeights::kNone && L.state_dtype == L.dtype) || L.dtype == c10::ScalarType::Double) {
    return false;
  }
  auto with_state = [&](auto t) {
    L.state_dtype == c10::ScalarType::BFloat16 ? fn(t, c10::BFloat16()) : fn(t, float());
  };
  switch (L.dtype) {
    case c10::ScalarType::Float: with_state(float()); break;
    case c10::ScalarType::Half: with_state(c10::Half()); break;
    case c10::ScalarType::BFloat16: with_state(c10::BFloat16()); break;
    default: TORCH_INTERNAL_ASSERT(false, "lamb_step_cpu: unexpected dtype ", L.dtype);
  }
  return true;
}

}  // namespace

void lamb_moments_kernel(const LambCpuLaunch& L, double* partial) {
  if (dispatch_mixed(L, [&](auto t, auto u) { moments_mixed<decltype(t), decltype(u)>(L, partial); })) {
    return;
  }
  switch (L.dtype) {
    case c10::ScalarType::Float: return moments_all<float>(L, partial);
    case c10::ScalarType::Double: return moments_all<double>(L, partial);
    case c10::ScalarType::Half: return moments_all<c10::Half>(L, partial);
    case c10::ScalarType::BFloat16: return moments_all<c10::BFloat16>(L, partial);
    default: TORCH_INTERNAL_ASSERT(false, "lamb_step_cpu: unexpected dtype ", L.dtype);
  }
}

void lamb_apply_kernel(const LambCpuLaunch& L, const double* ratio) {
  if (dispatch_mixed(L, [&](auto t, auto u) { apply_mixed<decltype(t), decltype(u)>(L, ratio); })) {
    return;
  }
  switch (L.dtype) {
    case c10::ScalarType::Float: return apply_all<float>(L, ratio);
    case c10::ScalarType::Double: return apply_all<double>(L, ratio);
    case c10::ScalarType::Half: return apply_all<c10::Half>(L, ratio);
    case c10::ScalarType::BFloat16: return apply_all<c10::BFloat16>(L, ratio);
    default: TORCH_INTERNAL_ASSERT(false, "lamb_step_cpu: unexpected dtype ", L.dtype);
  }
}

}  // namespace pyoptim::cpu::CPU_CAPABILITY
