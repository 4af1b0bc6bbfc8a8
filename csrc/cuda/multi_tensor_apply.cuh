// The CUDA side of a multi-tensor op: metadata passed by value, one generic
// chunked kernel, and the elementwise loop every elementwise op shares (the
// apex multi_tensor_apply design, with the plan of
// csrc/include/pyoptim/multi_tensor.h that the CPU path runs too).
//
// An op supplies a device functor `f(meta, slot, begin, end)` that serves
// elements [begin, end) of tensor `slot` of the launch; elementwise ops call
// elementwise_chunk() from it with their per-element math.
#pragma once

#include <cstdint>
#include <functional>
#include <limits>
#include <vector>

#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/irange.h>

#include <pyoptim/multi_tensor.h>

#include "vec.cuh"

namespace pyoptim::cuda {

// Elements per block: 64K, as in apex's and ATen's multi_tensor_apply; a
// 16M-element tensor is 256 blocks, two waves on 132 SMs.
constexpr int64_t kChunkSize = 65536;
constexpr int kBlockSize = 512;
// Vectors per thread per iteration: all loads are issued before any math,
// for more bytes in flight per thread.
constexpr int kUnroll = 2;
// Tensors per launch. With up to 6 pointers per tensor the metadata is about
// 20 KB, under the 32,764-byte kernel-parameter limit of CUDA 12.1+ on sm_70+,
// so 2,000 small tensors take 7 launches where ATen's 4 KB metadata (36
// tensors of 5 lists) takes 56.
constexpr int kMaxTensors = 320;

// N pointer lists, plus the op's own by-value data `Extra` (hyperparameters).
template <int N, typename Extra>
struct MultiTensorMeta {
  void* ptr[N][kMaxTensors];
  int64_t numel[kMaxTensors];
  int32_t chunk_prefix[kMaxTensors + 1];
  uint8_t group[kMaxTensors];  // the tensor's param group, relative to group_base
  int32_t num_tensors;
  int32_t group_base;
  int32_t first_tensor;  // index of slot 0 in the op's whole tensor list
  Extra extra;
};

template <typename Meta, typename Functor>
__global__ void __launch_bounds__(kBlockSize) multi_tensor_kernel(const __grid_constant__ Meta meta, Functor f) {
  const int64_t c = blockIdx.x;
  const int slot = find_slot(meta.chunk_prefix, meta.num_tensors, c);
  const int64_t begin = (c - meta.chunk_prefix[slot]) * kChunkSize;
  const int64_t end = ::min(begin + kChunkSize, meta.numel[slot]);
  f(meta, slot, begin, end);
}

// Plans the launches for tensors of `numel` elements (per-tensor param group
// `group_of`, at most `max_groups` groups per launch; both may be empty) and
// fills each launch's metadata, calling fill(meta, slot, tensor) per tensor.
template <int N, typename Extra, typename Fill>
std::vector<MultiTensorMeta<N, Extra>> build_metas(const std::vector<int64_t>& numel,
                                                   const std::vector<int64_t>& group_of, int64_t max_groups,
                                                   const Fill& fill) {
  using Meta = MultiTensorMeta<N, Extra>;
  static_assert(sizeof(Meta) < 32000, "metadata exceeds the kernel-parameter limit");
  const auto plan = plan_launch_groups(numel, kChunkSize, kMaxTensors, std::numeric_limits<int32_t>::max(), group_of,
                                       max_groups);
  std::vector<Meta> metas(plan.size());
  for (const auto l : c10::irange(plan.size())) {
    const LaunchGroup& launch = plan[l];
    Meta& meta = metas[l];
    meta = Meta{};
    meta.num_tensors = static_cast<int32_t>(launch.num_tensors);
    meta.first_tensor = static_cast<int32_t>(launch.first_tensor);
    meta.group_base = group_of.empty() ? 0 : static_cast<int32_t>(group_of[launch.first_tensor]);
    for (const auto s : c10::irange(launch.num_tensors)) {
      const int64_t i = launch.first_tensor + s;
      meta.numel[s] = numel[i];
      meta.chunk_prefix[s] = static_cast<int32_t>(launch.chunk_prefix[s]);
      const int64_t local = group_of.empty() ? 0 : group_of[i] - meta.group_base;
      TORCH_INTERNAL_ASSERT(local >= 0 && local < max_groups && local < 256);
      meta.group[s] = static_cast<uint8_t>(local);
      fill(meta, static_cast<int>(s), i);
    }
    meta.chunk_prefix[launch.num_tensors] = static_cast<int32_t>(launch.num_chunks());
  }
  return metas;
}

template <typename Meta>
int64_t num_chunks(const Meta& meta) {
  return meta.chunk_prefix[meta.num_tensors];
}

// Launches f over the chunks of one launch's metadata (none: no launch).
template <typename Meta, typename Functor>
void launch_chunks(const Meta& meta, const Functor& f, cudaStream_t stream) {
  if (num_chunks(meta) == 0) {
    return;
  }
  multi_tensor_kernel<<<static_cast<unsigned int>(num_chunks(meta)), kBlockSize, 0, stream>>>(meta, f);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// build_metas, then for each launch before(meta) and f over its chunks.
template <int N, typename Extra, typename Functor, typename Fill, typename Before>
void multi_tensor_apply(const std::vector<int64_t>& numel, const std::vector<int64_t>& group_of, int64_t max_groups,
                        cudaStream_t stream, const Fill& fill, const Before& before, const Functor& f) {
  for (const auto& meta : build_metas<N, Extra>(numel, group_of, max_groups, fill)) {
    before(meta);
    launch_chunks(meta, f, stream);
  }
}

// Applies op(x) to elements [begin, end) of the N arrays `ptr`, x being the
// elements' values in at::opmath_type<T>; arrays whose LOAD bit is set are
// read, those whose STORE bit is set written back. 16-byte vector accesses
// when every used pointer is 16-byte aligned, else (and for the tail)
// element by element.
template <typename T, int N, unsigned LOAD, unsigned STORE, typename Op>
__device__ __forceinline__ void elementwise_chunk(T* const (&ptr)[N], int64_t begin, int64_t end, const Op& op) {
  using S = at::opmath_type<T>;
  constexpr int kVec = 16 / sizeof(T);
  using V = AlignedVec<T, kVec>;
  bool aligned = true;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    if ((LOAD >> k) & 1u) {
      aligned = aligned && reinterpret_cast<uintptr_t>(ptr[k]) % 16 == 0;
    }
  }
  int64_t tail = begin;
  if (aligned) {
    const int64_t n_vec = (end - begin) / kVec;
    for (int64_t base = threadIdx.x; base < n_vec; base += static_cast<int64_t>(kBlockSize) * kUnroll) {
      V r[kUnroll][N];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t e = begin + (base + u * kBlockSize) * kVec;
        if (base + u * kBlockSize < n_vec) {
#pragma unroll
          for (int k = 0; k < N; ++k) {
            if ((LOAD >> k) & 1u) {
              r[u][k] = *reinterpret_cast<const V*>(ptr[k] + e);
            }
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t e = begin + (base + u * kBlockSize) * kVec;
        if (base + u * kBlockSize < n_vec) {
#pragma unroll
          for (int j = 0; j < kVec; ++j) {
            S x[N];
#pragma unroll
            for (int k = 0; k < N; ++k) {
              x[k] = ((LOAD >> k) & 1u) ? static_cast<S>(r[u][k].val[j]) : S(0);
            }
            op(x);
#pragma unroll
            for (int k = 0; k < N; ++k) {
              if ((STORE >> k) & 1u) {
                r[u][k].val[j] = static_cast<T>(x[k]);
              }
            }
          }
#pragma unroll
          for (int k = 0; k < N; ++k) {
            if ((STORE >> k) & 1u) {
              *reinterpret_cast<V*>(ptr[k] + e) = r[u][k];
            }
          }
        }
      }
    }
    tail = begin + n_vec * kVec;
  }
  for (int64_t j = tail + threadIdx.x; j < end; j += kBlockSize) {
    S x[N];
#pragma unroll
    for (int k = 0; k < N; ++k) {
      x[k] = ((LOAD >> k) & 1u) ? static_cast<S>(ptr[k][j]) : S(0);
    }
    op(x);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if ((STORE >> k) & 1u) {
        ptr[k][j] = static_cast<T>(x[k]);
      }
    }
  }
}

}  // namespace pyoptim::cuda
