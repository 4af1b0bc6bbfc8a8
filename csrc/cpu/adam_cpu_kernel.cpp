// The CPU Adam kernel. setup.py builds this file once per instruction set
// (with CPU_CAPABILITY set to DEFAULT, AVX2 or AVX512 and the matching -m
// flags); adam_cpu.cpp calls the one the running CPU supports.
#include <algorithm>
#include <tuple>
#include <type_traits>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <pyoptim/adam.h>

#include "adam_cpu.h"
#include "vec_math.h"

#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif

namespace pyoptim::cpu::CPU_CAPABILITY {

namespace {

template <typename T, bool AMSGRAD, bool DECOUPLED>
void adam_range(const AdamCpuLaunch& L, int64_t i, int64_t begin, int64_t end) {
  using S = at::opmath_type<T>;
  using Vec = at::vec::Vectorized<S>;
  const AdamScalars<S> sc = adam_scalars<S>(L.hyper[i], L.lr[i], L.step[i], L.grad_mul);
  const AdamCoeffs<Vec> cv(sc);
  const AdamCoeffs<S> cs(sc);
  T* p = static_cast<T*>(L.p[i]);
  const T* g = static_cast<const T*>(L.g[i]);
  T* m = static_cast<T*>(L.m[i]);
  T* v = static_cast<T*>(L.v[i]);
  T* vm = AMSGRAD ? static_cast<T*>(L.vm[i]) : nullptr;
  int64_t j = begin;
  if constexpr (std::is_same_v<T, S>) {
    constexpr int64_t W = Vec::size();
    for (; j + W <= end; j += W) {
      Vec pv = Vec::loadu(p + j), mv = Vec::loadu(m + j), vv = Vec::loadu(v + j);
      Vec vmv = AMSGRAD ? Vec::loadu(vm + j) : Vec();
      adam_update<AMSGRAD, DECOUPLED>(pv, Vec::loadu(g + j), mv, vv, vmv, cv);
      pv.store(p + j);
      mv.store(m + j);
      vv.store(v + j);
      if (AMSGRAD) {
        vmv.store(vm + j);
      }
    }
  } else {
    // fp16/bf16 storage: one storage vector holds two float vectors.
    using VecT = at::vec::Vectorized<T>;
    constexpr int64_t W = VecT::size();
    static_assert(W == 2 * Vec::size());
    for (; j + W <= end; j += W) {
      auto [p0, p1] = at::vec::convert_to_float<T>(VecT::loadu(p + j));
      auto [g0, g1] = at::vec::convert_to_float<T>(VecT::loadu(g + j));
      auto [m0, m1] = at::vec::convert_to_float<T>(VecT::loadu(m + j));
      auto [v0, v1] = at::vec::convert_to_float<T>(VecT::loadu(v + j));
      Vec vm0, vm1;
      if (AMSGRAD) {
        std::tie(vm0, vm1) = at::vec::convert_to_float<T>(VecT::loadu(vm + j));
      }
      adam_update<AMSGRAD, DECOUPLED>(p0, g0, m0, v0, vm0, cv);
      adam_update<AMSGRAD, DECOUPLED>(p1, g1, m1, v1, vm1, cv);
      at::vec::convert_from_float<T>(p0, p1).store(p + j);
      at::vec::convert_from_float<T>(m0, m1).store(m + j);
      at::vec::convert_from_float<T>(v0, v1).store(v + j);
      if (AMSGRAD) {
        at::vec::convert_from_float<T>(vm0, vm1).store(vm + j);
      }
    }
  }
  // Tail: the same update on scalars, as the GPU runs it.
  for (; j < end; ++j) {
    S ps = static_cast<S>(p[j]), ms = static_cast<S>(m[j]), vs = static_cast<S>(v[j]);
    S vms = AMSGRAD ? static_cast<S>(vm[j]) : S(0);
    adam_update<AMSGRAD, DECOUPLED>(ps, static_cast<S>(g[j]), ms, vs, vms, cs);
    p[j] = static_cast<T>(ps);
    m[j] = static_cast<T>(ms);
    v[j] = static_cast<T>(vs);
    if (AMSGRAD) {
      vm[j] = static_cast<T>(vms);
    }
  }
}

template <typename T, bool AMSGRAD, bool DECOUPLED>
void adam_all(const AdamCpuLaunch& L) {
  const LaunchGroup& plan = L.plan;
  const int n = static_cast<int>(plan.num_tensors);
  // One parallel region over every tensor's chunks (not one per tensor): the
  // per-tensor fork/join is what holds torch's CPU foreach/fused paths to a
  // third of the bandwidth on many small tensors.
  at::parallel_for(0, plan.num_chunks(), 1, [&](int64_t c_begin, int64_t c_end) {
    int64_t c = c_begin;
    while (c < c_end) {
      const int slot = find_slot(plan.chunk_prefix.data(), n, c);
      const int64_t i = plan.first_tensor + slot;
      // This task's chunks of tensor i, as one element range.
      const int64_t last = std::min(c_end, plan.chunk_prefix[slot + 1]);
      const int64_t begin = (c - plan.chunk_prefix[slot]) * kAdamCpuChunk;
      const int64_t end = std::min((last - plan.chunk_prefix[slot]) * kAdamCpuChunk, L.numel[i]);
      adam_range<T, AMSGRAD, DECOUPLED>(L, i, begin, end);
      c = last;
    }
  });
}

template <typename T>
void adam_dispatch_flags(const AdamCpuLaunch& L) {
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
