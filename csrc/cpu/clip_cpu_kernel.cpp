// The CPU kernels of multi_tensor_norm and clip_scale_, built once per
// instruction set (see cpu_isa.h).
#include <ATen/OpMathType.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <pyoptim/vector_norm.h>

#include "clip_cpu.h"
#include "multi_tensor_cpu.h"
#include "vec_math.h"

#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif

namespace pyoptim::cpu::CPU_CAPABILITY {

namespace {

// Independent vector accumulators per chunk: enough to hide the add latency,
// and each sums at most chunk / (lanes * kAcc) terms in the math type (256
// for fp32 under AVX-512) before the chunk's total is taken in double.
constexpr int kAcc = 4;

template <typename T, NormKind K>
double chunk_norm(const T* x, int64_t begin, int64_t end, double p) {
  using S = at::opmath_type<T>;
  using Vec = at::vec::Vectorized<S>;
  const Vec pv(static_cast<S>(p));
  Vec acc[kAcc];
  for (int a = 0; a < kAcc; ++a) {
    acc[a] = Vec(S(0));
  }
  int64_t j = begin;
  if constexpr (std::is_same_v<T, S>) {
    constexpr int64_t W = Vec::size();
    for (; j + kAcc * W <= end; j += kAcc * W) {
      for (int a = 0; a < kAcc; ++a) {
        acc[a] = norm_combine<K>(acc[a], norm_term<K>(Vec::loadu(x + j + a * W), pv));
      }
    }
  } else {
    using VecT = at::vec::Vectorized<T>;
    constexpr int64_t W = VecT::size();
    for (; j + 2 * W <= end; j += 2 * W) {
      for (int h = 0; h < 2; ++h) {
        auto [lo, hi] = at::vec::convert_to_float<T>(VecT::loadu(x + j + h * W));
        acc[2 * h] = norm_combine<K>(acc[2 * h], norm_term<K>(lo, pv));
        acc[2 * h + 1] = norm_combine<K>(acc[2 * h + 1], norm_term<K>(hi, pv));
      }
    }
  }
  double total = 0.0;
  for (int a = 0; a < kAcc; ++a) {
    S lanes[Vec::size()];
    acc[a].store(lanes);
    for (int l = 0; l < Vec::size(); ++l) {
      total = norm_combine<K>(total, static_cast<double>(lanes[l]));
    }
  }
  for (; j < end; ++j) {
    total = norm_combine<K>(total, norm_term<K>(static_cast<double>(x[j]), p));
  }
  return total;
}

template <typename T, NormKind K>
void norm_all(const MultiTensorCpuLaunch& L, double p, double* partial) {
  parallel_each_chunk(L.plan, kNormCpuChunk, L.numel.data(), [&](int64_t i, int64_t c, int64_t begin, int64_t end) {
    prefetch_next(i, L.ptr);
    partial[c] = chunk_norm<T, K>(static_cast<const T*>(L.ptr[i]), begin, end, p);
  });
}

template <typename T>
void norm_dispatch_kind(const MultiTensorCpuLaunch& L, NormKind kind, double p, double* partial) {
  switch (kind) {
    case NormKind::L1: return norm_all<T, NormKind::L1>(L, p, partial);
    case NormKind::L2: return norm_all<T, NormKind::L2>(L, p, partial);
    case NormKind::Linf: return norm_all<T, NormKind::Linf>(L, p, partial);
    default: return norm_all<T, NormKind::Lp>(L, p, partial);
  }
}

template <typename S>
struct ScaleOp {
  VecAndScalar<MathCoeff, S> coef;
  template <typename M>
  void operator()(M (&x)[1]) const {
    x[0] = x[0] * coef.get(static_cast<const M*>(nullptr)).value;
  }
};

template <typename T>
void scale_all(const MultiTensorCpuLaunch& L, float coef) {
  using S = at::opmath_type<T>;
  const ScaleOp<S> op{VecAndScalar<MathCoeff, S>(static_cast<S>(coef))};
  parallel_chunks(L.plan, kNormCpuChunk, L.numel.data(), [&](int64_t i, int64_t begin, int64_t end) {
    prefetch_next(i, L.ptr);
    T* const ptr[1] = {static_cast<T*>(L.ptr[i])};
    elementwise_range<T, 1, 0b1u, 0b1u>(ptr, begin, end, op);
  });
}

}  // namespace

void norm_kernel(const MultiTensorCpuLaunch& L, NormKind kind, double p, double* partial) {
  switch (L.dtype) {
    case c10::ScalarType::Float: return norm_dispatch_kind<float>(L, kind, p, partial);
    case c10::ScalarType::Double: return norm_dispatch_kind<double>(L, kind, p, partial);
    case c10::ScalarType::Half: return norm_dispatch_kind<c10::Half>(L, kind, p, partial);
    case c10::ScalarType::BFloat16: return norm_dispatch_kind<c10::BFloat16>(L, kind, p, partial);
    default: TORCH_INTERNAL_ASSERT(false, "multi_tensor_norm_cpu: unexpected dtype ", L.dtype);
  }
}

void scale_kernel(const MultiTensorCpuLaunch& L, float coef) {
  switch (L.dtype) {
    case c10::ScalarType::Float: return scale_all<float>(L, coef);
    case c10::ScalarType::Double: return scale_all<double>(L, coef);
    case c10::ScalarType::Half: return scale_all<c10::Half>(L, coef);
    case c10::ScalarType::BFloat16: return scale_all<c10::BFloat16>(L, coef);
    default: TORCH_INTERNAL_ASSERT(false, "clip_scale_cpu: unexpected dtype ", L.dtype);
  }
}

}  // namespace pyoptim::cpu::CPU_CAPABILITY
