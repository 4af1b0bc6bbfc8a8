// The CPU side of a multi-tensor op: one parallel region over every tensor's
// chunks (the plan of csrc/include/pyoptim/multi_tensor.h, the mapping the
// GPU runs), and the vectorized elementwise loop every elementwise op shares.
//
// An elementwise op is a functor with two call operators: one taking an
// array of N at::vec::Vectorized<S> (the vector body), one taking an array of
// N scalars S (the tail); both usually forward to one template in
// csrc/include/pyoptim. LOAD and STORE are bit masks over the N arrays: an
// array is read only if its LOAD bit is set, written back only if its STORE
// bit is set (grads are read, never written).
#pragma once

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <pyoptim/math.h>
#include <pyoptim/multi_tensor.h>

namespace pyoptim::cpu::PYOPTIM_ISA {  // note [ISA namespaces]

// Asks for the first cache line of tensor i + 4 in each per-tensor pointer
// list, for a kernel's call on tensor i: over thousands of tiny tensors each
// step is otherwise a cache miss per list (note [one pass] in
// multi_tensor_host.cpp). A list shorter than that (empty: unused) is left.
template <typename... P>
inline void prefetch_next(int64_t i, const std::vector<P>&... lists) {
  constexpr int64_t kAhead = 4;
  ((i + kAhead < static_cast<int64_t>(lists.size()) ? __builtin_prefetch(lists[i + kAhead]) : void()), ...);
}

// Calls fn(tensor, begin, end) for element ranges covering every tensor of
// `plan`, in parallel: each task takes a run of chunks, and a run that spans
// several chunks of one tensor is one call.
template <typename Fn>
void parallel_chunks(const LaunchGroup& plan, int64_t chunk_size, const int64_t* numel, const Fn& fn) {
  const int n = static_cast<int>(plan.num_tensors);
  at::parallel_for(0, plan.num_chunks(), 1, [&](int64_t c_begin, int64_t c_end) {
    int64_t c = c_begin;
    int slot = find_slot(plan.chunk_prefix.data(), n, c);
    while (c < c_end) {
      while (plan.chunk_prefix[slot + 1] <= c) {  // the next tensor with a chunk (a search per tensor costs
        ++slot;                                   // more than the step of a tiny one)
      }
      const int64_t i = plan.first_tensor + slot;
      const int64_t last = std::min(c_end, plan.chunk_prefix[slot + 1]);
      const int64_t begin = (c - plan.chunk_prefix[slot]) * chunk_size;
      const int64_t end = std::min((last - plan.chunk_prefix[slot]) * chunk_size, numel[i]);
      fn(i, begin, end);
      c = last;
    }
  });
}

// Calls fn(tensor, chunk, begin, end) once per chunk of `plan` (chunk: the
// chunk's index in the plan), in parallel: for reductions whose partials
// must not depend on how chunks were split among threads.
template <typename Fn>
void parallel_each_chunk(const LaunchGroup& plan, int64_t chunk_size, const int64_t* numel, const Fn& fn) {
  const int n = static_cast<int>(plan.num_tensors);
  at::parallel_for(0, plan.num_chunks(), 1, [&](int64_t c_begin, int64_t c_end) {
    int slot = find_slot(plan.chunk_prefix.data(), n, c_begin);
    for (int64_t c = c_begin; c < c_end; ++c) {
      while (plan.chunk_prefix[slot + 1] <= c) {
        ++slot;
      }
      const int64_t i = plan.first_tensor + slot;
      const int64_t begin = (c - plan.chunk_prefix[slot]) * chunk_size;
      fn(i, c, begin, std::min(begin + chunk_size, numel[i]));
    }
  });
}

// Applies `op` to elements [begin, end) of the N arrays `ptr` (storage type
// T, math in at::opmath_type<T>), in place.
template <typename T, int N, unsigned LOAD, unsigned STORE, typename Op>
void elementwise_range(T* const (&ptr)[N], int64_t begin, int64_t end, const Op& op) {
  using S = at::opmath_type<T>;
  using Vec = at::vec::Vectorized<S>;
  int64_t j = begin;
  if constexpr (std::is_same_v<T, S>) {
    constexpr int64_t W = Vec::size();
    for (; j + W <= end; j += W) {
      Vec x[N];
      for (int k = 0; k < N; ++k) {
        if ((LOAD >> k) & 1u) {
          x[k] = Vec::loadu(ptr[k] + j);
        }
      }
      op(x);
      for (int k = 0; k < N; ++k) {
        if ((STORE >> k) & 1u) {
          x[k].store(ptr[k] + j);
        }
      }
    }
    if (j < end) {
      // The tail as one partial vector (masked loads and stores where the
      // ISA has them): a tiny tensor is all tail, and a scalar loop over it
      // costs more than the rest of its step.
      const int64_t count = end - j;
      Vec x[N];
      for (int k = 0; k < N; ++k) {
        x[k] = ((LOAD >> k) & 1u) ? Vec::loadu(ptr[k] + j, count) : Vec(S(0));
      }
      op(x);
      for (int k = 0; k < N; ++k) {
        if ((STORE >> k) & 1u) {
          x[k].store(ptr[k] + j, count);
        }
      }
      return;
    }
  } else {
    // fp16/bf16 storage: one storage vector holds two float vectors.
    using VecT = at::vec::Vectorized<T>;
    constexpr int64_t W = VecT::size();
    static_assert(W == 2 * Vec::size());
    for (; j + W <= end; j += W) {
      Vec lo[N], hi[N];
      for (int k = 0; k < N; ++k) {
        if ((LOAD >> k) & 1u) {
          std::tie(lo[k], hi[k]) = at::vec::convert_to_float<T>(VecT::loadu(ptr[k] + j));
        }
      }
      op(lo);
      op(hi);
      for (int k = 0; k < N; ++k) {
        if ((STORE >> k) & 1u) {
          at::vec::convert_from_float<T>(lo[k], hi[k]).store(ptr[k] + j);
        }
      }
    }
  }
  // The fp16/bf16 tail, on scalars, as the GPU runs it.
  for (; j < end; ++j) {
    S x[N];
    for (int k = 0; k < N; ++k) {
      x[k] = ((LOAD >> k) & 1u) ? static_cast<S>(ptr[k][j]) : S(0);
    }
    op(x);
    for (int k = 0; k < N; ++k) {
      if ((STORE >> k) & 1u) {
        ptr[k][j] = static_cast<T>(x[k]);
      }
    }
  }
}

// One coefficient as an op's coefficient struct (for VecAndScalar).
template <typename M>
struct MathCoeff {
  M value;
  template <typename S>
  explicit MathCoeff(S s) : value(MathOps<M>::splat(s)) {}
};

// A math type's coefficients in both forms an elementwise op needs: broadcast
// into vector registers for the body, scalar for the tail.
template <template <typename> class Coeffs, typename S>
struct VecAndScalar {
  Coeffs<at::vec::Vectorized<S>> vec;
  Coeffs<S> scalar;
  template <typename Scalars>
  explicit VecAndScalar(const Scalars& s) : vec(s), scalar(s) {}
  const Coeffs<at::vec::Vectorized<S>>& get(const at::vec::Vectorized<S>*) const { return vec; }
  const Coeffs<S>& get(const S*) const { return scalar; }
};

}  // namespace pyoptim::cpu::PYOPTIM_ISA
