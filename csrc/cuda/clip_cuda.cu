// multi_tensor_norm and clip_scale_ on CUDA tensors: chunked multi-tensor
// launches (multi_tensor_apply.cuh) of the math in
// csrc/include/pyoptim/{norm,clip}.h, the code the CPU tests run.
//
// The norm is deterministic and never syncs the host: each block writes its
// chunk's accumulation (in double) to a partials buffer; one block per launch
// then reduces each tensor's chunks in order, and one thread combines the
// launches.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <pyoptim/clip.h>
#include <pyoptim/vector_norm.h>

#include "../multi_tensor_host.h"
#include "../message.h"
#include "block_reduce.cuh"
#include "multi_tensor_apply.cuh"

namespace pyoptim::cuda {

namespace {

constexpr int kFinishThreads = 256;

struct NormExtra {
  int64_t chunk_base;  // index of this launch's first chunk in the partials
};
using NormMeta = MultiTensorMeta<1, NormExtra>;
struct NoExtra {};
using ScaleMeta = MultiTensorMeta<1, NoExtra>;

template <NormKind K>
struct Combine {
  __device__ __forceinline__ double operator()(double a, double b) const { return norm_combine<K>(a, b); }
};

template <typename T, NormKind K>
struct NormFunctor {
  double* partial;  // [chunks of all launches]
  double p;

  __device__ __forceinline__ void operator()(const NormMeta& meta, int slot, int64_t begin, int64_t end) const {
    using S = at::opmath_type<T>;
    const S ps = static_cast<S>(p);
    double acc = 0.0;
    T* const ptr[1] = {static_cast<T*>(meta.ptr[0][slot])};
    elementwise_chunk<T, 1, 0b1u, 0b0u>(ptr, begin, end, [&](S(&x)[1]) {
      acc = norm_combine<K>(acc, static_cast<double>(norm_term<K>(x[0], ps)));
    });
    acc = block_reduce(acc, Combine<K>());
    if (threadIdx.x == 0) {
      partial[meta.extra.chunk_base + blockIdx.x] = acc;
    }
  }
};

// One block per launch: each tensor's chunks reduced in order, its norm
// written, and the launch's accumulation to launch_acc[launch].
template <NormKind K>
__global__ void norm_tensors_kernel(const __grid_constant__ NormMeta meta, const double* partial, double p,
                                    float* per_tensor, double* launch_acc, int launch) {
  double total = 0.0;
  for (int s = threadIdx.x; s < meta.num_tensors; s += blockDim.x) {
    double acc = 0.0;
    for (int64_t c = meta.chunk_prefix[s]; c < meta.chunk_prefix[s + 1]; ++c) {
      acc = norm_combine<K>(acc, partial[meta.extra.chunk_base + c]);
    }
    per_tensor[meta.first_tensor + s] = static_cast<float>(norm_finish<K>(acc, p));
    total = norm_combine<K>(total, acc);
  }
  total = block_reduce(total, Combine<K>());
  if (threadIdx.x == 0) {
    launch_acc[launch] = total;
  }
}

template <NormKind K>
__global__ void norm_total_kernel(const double* launch_acc, int launches, double p, float* total) {
  double acc = 0.0;
  for (int l = 0; l < launches; ++l) {
    acc = norm_combine<K>(acc, launch_acc[l]);
  }
  *total = static_cast<float>(norm_finish<K>(acc, p));
}

template <typename T, NormKind K>
void run_norm(const std::vector<NormMeta>& metas, double p, double* partial, float* per_tensor, double* launch_acc,
              float* total, cudaStream_t stream) {
  const NormFunctor<T, K> f{partial, p};
  for (const auto l : c10::irange(metas.size())) {
    launch_chunks(metas[l], f, stream);
    norm_tensors_kernel<K><<<1, kFinishThreads, 0, stream>>>(metas[l], partial, p, per_tensor, launch_acc,
                                                            static_cast<int>(l));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  norm_total_kernel<K><<<1, 1, 0, stream>>>(launch_acc, static_cast<int>(metas.size()), p, total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
struct ScaleFunctor {
  const float* total_norm;
  float max_norm;

  __device__ __forceinline__ void operator()(const ScaleMeta& meta, int slot, int64_t begin, int64_t end) const {
    using S = at::opmath_type<T>;
    const float coef = clip_coef(*total_norm, max_norm);
    if (coef == 1.0f) {
      return;  // x * 1 == x: skip the writes
    }
    const S c = static_cast<S>(coef);
    T* const ptr[1] = {static_cast<T*>(meta.ptr[0][slot])};
    elementwise_chunk<T, 1, 0b1u, 0b1u>(ptr, begin, end, [&](S(&x)[1]) { x[0] = x[0] * c; });
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> multi_tensor_norm_cuda(at::TensorList tensors, double norm_type) {
  const char* op = "multi_tensor_norm";
  const TensorScan scan = check_tensor_lists(op, c10::DeviceType::CUDA, {"tensors", tensors}, {});
  PYOPTIM_CHECK(norm_type > 0.0, op, ": norm_type must be positive, got ", norm_type);
  PYOPTIM_CHECK(!tensors.empty(), op, ": needs at least one tensor");
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = static_cast<int64_t>(tensors.size());
  const int64_t groups[1] = {n};
  MultiTensorWork work = prepare_work({tensors}, {false}, groups, &scan);
  const DataPrefetch ahead({tensors});
  auto fill = [&](NormMeta& meta, int s, int64_t i) {
    ahead(i);
    meta.ptr[0][s] = work.lists[0][i].data_ptr();
  };
  std::vector<NormMeta> metas = build_metas<1, NormExtra>(work.numel, {}, 1, fill);
  int64_t chunks = 0;
  for (auto& meta : metas) {
    meta.extra.chunk_base = chunks;
    chunks += num_chunks(meta);
  }
  const auto f32 = tensors[0].options().dtype(at::kFloat);
  const auto f64 = tensors[0].options().dtype(at::kDouble);
  at::Tensor partial = at::empty({std::max<int64_t>(chunks, 1)}, f64);
  at::Tensor launch_acc = at::empty({static_cast<int64_t>(metas.size())}, f64);
  at::Tensor per_tensor = at::empty({n}, f32);
  at::Tensor total = at::empty({}, f32);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "multi_tensor_norm_cuda", [&] {
    auto args = std::make_tuple(norm_type, partial.data_ptr<double>(), per_tensor.data_ptr<float>(),
                                launch_acc.data_ptr<double>(), total.data_ptr<float>(), stream);
    switch (norm_kind(norm_type)) {
      case NormKind::L1: std::apply([&](auto... a) { run_norm<scalar_t, NormKind::L1>(metas, a...); }, args); break;
      case NormKind::L2: std::apply([&](auto... a) { run_norm<scalar_t, NormKind::L2>(metas, a...); }, args); break;
      case NormKind::Linf:
        std::apply([&](auto... a) { run_norm<scalar_t, NormKind::Linf>(metas, a...); }, args);
        break;
      default: std::apply([&](auto... a) { run_norm<scalar_t, NormKind::Lp>(metas, a...); }, args); break;
    }
  });
  return {total, per_tensor};
}

void clip_scale_cuda(at::TensorList tensors, const at::Tensor& total_norm, double max_norm) {
  const char* op = "clip_scale_";
  const TensorScan scan = check_tensor_lists(op, c10::DeviceType::CUDA, {"tensors", tensors}, {});
  PYOPTIM_CHECK(max_norm >= 0.0, op, ": max_norm must be non-negative, got ", max_norm);
  if (tensors.empty()) {
    return;
  }
  check_aux_tensor(op, "total_norm", total_norm, tensors[0].device(), 1, at::kFloat);
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t groups[1] = {static_cast<int64_t>(tensors.size())};
  MultiTensorWork work = prepare_work({tensors}, {true}, groups, &scan);
  auto fill = [&](ScaleMeta& meta, int s, int64_t i) { meta.ptr[0][s] = work.lists[0][i].data_ptr(); };
  auto nothing_before = [](const ScaleMeta&) {};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "clip_scale_cuda", [&] {
    multi_tensor_apply<1, NoExtra>(work.numel, {}, 1, stream, fill, nothing_before,
                                   ScaleFunctor<scalar_t>{total_norm.const_data_ptr<float>(),
                                                          static_cast<float>(max_norm)});
  });
  work.finish();
}

}  // namespace pyoptim::cuda

TORCH_LIBRARY_IMPL(pyoptim, CUDA, m) {
  m.impl("multi_tensor_norm", &pyoptim::cuda::multi_tensor_norm_cuda);
  m.impl("clip_scale_", &pyoptim::cuda::clip_scale_cuda);
}
