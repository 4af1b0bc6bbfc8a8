// Loads and stores of at::vec::Vectorized for the CPU kernels built once per
// instruction set (setup.py's ISA_SOURCES): storage type T read as vectors of
// the math type, streaming stores for outputs larger than the caches, and an
// in-order lane sum. Shared by norm_cpu_kernel.cpp and batch_norm_cpu_kernel.cpp.
#pragma once

#include <cstdint>
#include <type_traits>

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include <pyoptim/macros.h>

#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif

namespace pyoptim::cpu::CPU_CAPABILITY {

// Storage type T read as P vectors of the math type S: one vector for
// float/double storage, two float vectors per Vectorized<Half/BFloat16>.
template <typename T>
struct Lanes {
  using S = at::opmath_type<T>;
  using V = at::vec::Vectorized<S>;
  static constexpr int P = std::is_same_v<T, S> ? 1 : 2;
  static constexpr int64_t K = P * V::size();  // elements per step
};

// Loads K elements of U (T, or float weights beside a half/bfloat16 input).
template <int P, typename S, typename U>
PYOPTIM_INLINE void load(const U* p, at::vec::Vectorized<S> (&out)[P]) {
  using V = at::vec::Vectorized<S>;
  if constexpr (std::is_same_v<U, S>) {
    for (int k = 0; k < P; ++k) {
      out[k] = V::loadu(p + k * V::size());
    }
  } else {
    static_assert(P == 2);
    auto [a, b] = at::vec::convert_to_float<U>(at::vec::Vectorized<U>::loadu(p));
    out[0] = a;
    out[1] = b;
  }
}

template <int P, typename S, typename U>
PYOPTIM_INLINE void store(U* p, const at::vec::Vectorized<S> (&in)[P]) {
  if constexpr (std::is_same_v<U, S>) {
    for (int k = 0; k < P; ++k) {
      in[k].store(p + k * at::vec::Vectorized<S>::size());
    }
  } else {
    static_assert(P == 2);
    at::vec::convert_from_float<U>(in[0], in[1]).store(p);
  }
}

// load / store of the first n < K elements only (the lanes past n load as 0
// and are not stored): a tail that still runs the vector code, so each
// element's result does not depend on where a loop's vector steps fell.
template <int P, typename S, typename U>
PYOPTIM_INLINE void load_n(const U* p, at::vec::Vectorized<S> (&out)[P], int64_t n) {
  using V = at::vec::Vectorized<S>;
  if constexpr (std::is_same_v<U, S>) {
    for (int k = 0; k < P; ++k) {
      const int64_t m = n - k * V::size();
      out[k] = m <= 0 ? V(S(0)) : V::loadu(p + k * V::size(), m < V::size() ? m : V::size());
    }
  } else {
    static_assert(P == 2);
    auto [a, b] = at::vec::convert_to_float<U>(at::vec::Vectorized<U>::loadu(p, n));
    out[0] = a;
    out[1] = b;
  }
}

template <int P, typename S, typename U>
PYOPTIM_INLINE void store_n(U* p, const at::vec::Vectorized<S> (&in)[P], int64_t n) {
  using V = at::vec::Vectorized<S>;
  if constexpr (std::is_same_v<U, S>) {
    for (int k = 0; k < P; ++k) {
      const int64_t m = n - k * V::size();
      if (m > 0) {
        in[k].store(p + k * V::size(), m < V::size() ? m : V::size());
      }
    }
  } else {
    static_assert(P == 2);
    at::vec::convert_from_float<U>(in[0], in[1]).store(p, n);
  }
}

// note [streaming stores]: outputs far larger than the caches (y, dx) are
// written with non-temporal stores, which skip reading each line before
// writing it: a third less DRAM traffic in the forward, a quarter in the
// backward. They need vector-aligned addresses; rows that start unaligned
// take ordinary stores. sfence() orders them before the task ends.
#if defined(CPU_CAPABILITY_AVX512)
constexpr uintptr_t kStreamAlign = 64;
#elif defined(CPU_CAPABILITY_AVX2)
constexpr uintptr_t kStreamAlign = 32;
#else
constexpr uintptr_t kStreamAlign = 0;  // no streaming stores
#endif

template <typename U>
PYOPTIM_INLINE void stream_vec(U* p, const at::vec::Vectorized<U>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<U, float>) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(p), _mm512_castps_si512(v));
  } else if constexpr (std::is_same_v<U, double>) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(p), _mm512_castpd_si512(v));
  } else {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(p), static_cast<__m512i>(v));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<U, float>) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), _mm256_castps_si256(v));
  } else if constexpr (std::is_same_v<U, double>) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), _mm256_castpd_si256(v));
  } else {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), static_cast<__m256i>(v));
  }
#else
  v.store(p);
#endif
}

PYOPTIM_INLINE void stream_fence() {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  _mm_sfence();
#endif
}

// Whether a row of output starting at p can take streaming stores: every
// step of Lanes<T>::K elements is one whole vector register of T, so an
// aligned start keeps every step aligned.
template <typename T>
PYOPTIM_INLINE bool can_stream(bool wanted, const T* p) {
  return wanted && kStreamAlign != 0 && reinterpret_cast<uintptr_t>(p) % (kStreamAlign ? kStreamAlign : 1) == 0;
}

// store<P>, or streaming stores (note [streaming stores]) when `nt`.
template <int P, typename S, typename U>
PYOPTIM_INLINE void store_out(U* p, const at::vec::Vectorized<S> (&in)[P], bool nt) {
  if (!nt) {
    store<P>(p, in);
  } else if constexpr (std::is_same_v<U, S>) {
    static_assert(P == 1);
    stream_vec<U>(p, in[0]);
  } else {
    stream_vec<U>(p, at::vec::convert_from_float<U>(in[0], in[1]));
  }
}

template <typename V>
PYOPTIM_INLINE typename V::value_type lane_sum(const V& v) {
  // In lane order: the same result for the same row, whatever the call.
  typename V::value_type lanes[V::size()];
  v.store(lanes);
  typename V::value_type s = 0;
  for (int64_t i = 0; i < V::size(); ++i) {
    s += lanes[i];
  }
  return s;
}

}  // namespace pyoptim::cpu::CPU_CAPABILITY
