// adam_step_ on CUDA tensors: a chunked multi-tensor launch.
//
// Host side: checks and layout preparation are adam_host.cpp's (shared with
// the CPU path); the plan of launches and chunks is multi_tensor.h's (also
// shared). Each launch carries its tensors' pointers, sizes, steps and param
// groups' hyperparameters by value (one __grid_constant__ struct, under
// CUDA's 32 KB kernel-parameter limit), so a captured CUDA graph replays it
// as is. Block b serves one chunk of one tensor, found by binary search over
// the launch's chunk prefix sums. Device side: the per-element math is
// csrc/include/pyoptim/adam.h, the code the CPU tests run.
#include <algorithm>
#include <limits>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <pyoptim/adam.h>
#include <pyoptim/multi_tensor.h>

#include "../adam_host.h"

namespace pyoptim::cuda {

namespace {

// Elements per block: 64K, as in apex's and ATen's multi_tensor_apply; a
// 16M-element tensor is 256 blocks, two waves on 132 SMs.
constexpr int64_t kChunkSize = 65536;
constexpr int kBlockSize = 512;
// Vectors per thread per iteration: all loads issued before any math, for
// more bytes in flight per thread.
constexpr int kUnroll = 2;
// Tensors and param groups per launch: sized so AdamLaunchMeta stays under
// the 32,764-byte kernel-parameter limit of CUDA 12.1+ on sm_70+ (about
// 21 KB here), while 2,000 small tensors take 7 launches rather than the 56
// that ATen's 4 KB metadata (36 tensors) takes.
constexpr int kMaxTensors = 320;
constexpr int kMaxGroups = 32;

struct AdamLaunchMeta {
  void* p[kMaxTensors];
  const void* g[kMaxTensors];
  void* m[kMaxTensors];
  void* v[kMaxTensors];
  void* vm[kMaxTensors];
  float* step[kMaxTensors];
  int64_t numel[kMaxTensors];
  int32_t chunk_prefix[kMaxTensors + 1];
  uint8_t group[kMaxTensors];  // index into hyper
  AdamHyper hyper[kMaxGroups];
  int32_t num_tensors;
  int32_t group_base;  // global index of hyper[0] (for lr_tensor)
};
static_assert(sizeof(AdamLaunchMeta) < 32000, "AdamLaunchMeta exceeds the kernel-parameter limit");

// Advances every step of the launch unless found_inf is set. Runs before the
// update kernel, which reads the advanced value (as torch's fused Adam does).
__global__ void adam_step_count_kernel(const __grid_constant__ AdamLaunchMeta meta, const float* found_inf) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= meta.num_tensors || (found_inf != nullptr && *found_inf != 0.0f)) {
    return;
  }
  *meta.step[i] += 1.0f;
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T val[N];
};

template <typename T, bool AMSGRAD, bool DECOUPLED>
__global__ void __launch_bounds__(kBlockSize) adam_kernel(
    const __grid_constant__ AdamLaunchMeta meta,
    const double* lr_tensor,  // [groups] or null
    const float* grad_scale,  // [1] or null
    const float* found_inf,   // [1] or null
    bool maximize) {
  using S = at::opmath_type<T>;
  constexpr int kVec = 16 / sizeof(T);  // elements per 16-byte access
  if (found_inf != nullptr && *found_inf != 0.0f) {
    return;
  }
  const int64_t c = blockIdx.x;
  const int slot = find_slot(meta.chunk_prefix, meta.num_tensors, c);
  const int64_t begin = (c - meta.chunk_prefix[slot]) * kChunkSize;
  const int64_t end = ::min(begin + kChunkSize, meta.numel[slot]);
  const int k = meta.group[slot];

  const double lr = lr_tensor != nullptr ? lr_tensor[meta.group_base + k] : meta.hyper[k].lr;
  // GradScaler's own inverse: 1 / scale in double, rounded to float.
  double grad_mul = grad_scale != nullptr ? static_cast<double>(static_cast<float>(1.0 / *grad_scale)) : 1.0;
  if (maximize) {
    grad_mul = -grad_mul;
  }
  const AdamCoeffs<S> coeffs(adam_scalars<S>(meta.hyper[k], lr, static_cast<double>(*meta.step[slot]), grad_mul));

  T* __restrict__ p = static_cast<T*>(meta.p[slot]);
  const T* __restrict__ g = static_cast<const T*>(meta.g[slot]);
  T* __restrict__ m = static_cast<T*>(meta.m[slot]);
  T* __restrict__ v = static_cast<T*>(meta.v[slot]);
  T* __restrict__ vm = AMSGRAD ? static_cast<T*>(meta.vm[slot]) : nullptr;

  auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  const bool vectorize =
      aligned(p) && aligned(g) && aligned(m) && aligned(v) && (!AMSGRAD || aligned(vm));
  int64_t j0 = begin;
  if (vectorize) {
    using V = Vec<T, kVec>;
    const int64_t n_vec = (end - begin) / kVec;  // whole vectors in this chunk
    for (int64_t base = threadIdx.x; base < n_vec; base += static_cast<int64_t>(kBlockSize) * kUnroll) {
      V pv[kUnroll], gv[kUnroll], mv[kUnroll], vv[kUnroll], vmv[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t idx = base + u * kBlockSize;
        if (idx < n_vec) {
          const int64_t e = begin + idx * kVec;
          pv[u] = *reinterpret_cast<const V*>(p + e);
          gv[u] = *reinterpret_cast<const V*>(g + e);
          mv[u] = *reinterpret_cast<const V*>(m + e);
          vv[u] = *reinterpret_cast<const V*>(v + e);
          if (AMSGRAD) {
            vmv[u] = *reinterpret_cast<const V*>(vm + e);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t idx = base + u * kBlockSize;
        if (idx < n_vec) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            S ps = static_cast<S>(pv[u].val[e]), ms = static_cast<S>(mv[u].val[e]);
            S vs = static_cast<S>(vv[u].val[e]);
            S vms = AMSGRAD ? static_cast<S>(vmv[u].val[e]) : S(0);
            adam_update<AMSGRAD, DECOUPLED>(ps, static_cast<S>(gv[u].val[e]), ms, vs, vms, coeffs);
            pv[u].val[e] = static_cast<T>(ps);
            mv[u].val[e] = static_cast<T>(ms);
            vv[u].val[e] = static_cast<T>(vs);
            if (AMSGRAD) {
              vmv[u].val[e] = static_cast<T>(vms);
            }
          }
          const int64_t e = begin + idx * kVec;
          *reinterpret_cast<V*>(p + e) = pv[u];
          *reinterpret_cast<V*>(m + e) = mv[u];
          *reinterpret_cast<V*>(v + e) = vv[u];
          if (AMSGRAD) {
            *reinterpret_cast<V*>(vm + e) = vmv[u];
          }
        }
      }
    }
    j0 = begin + n_vec * kVec;
  }
  // The tail (and every element when a pointer is not 16-byte aligned).
  for (int64_t j = j0 + threadIdx.x; j < end; j += kBlockSize) {
    S ps = static_cast<S>(p[j]), ms = static_cast<S>(m[j]), vs = static_cast<S>(v[j]);
    S vms = AMSGRAD ? static_cast<S>(vm[j]) : S(0);
    adam_update<AMSGRAD, DECOUPLED>(ps, static_cast<S>(g[j]), ms, vs, vms, coeffs);
    p[j] = static_cast<T>(ps);
    m[j] = static_cast<T>(ms);
    v[j] = static_cast<T>(vs);
    if (AMSGRAD) {
      vm[j] = static_cast<T>(vms);
    }
  }
}

template <typename T>
void launch_adam(const AdamLaunchMeta& meta, int64_t num_chunks, bool amsgrad, bool decoupled,
                 const double* lr_tensor, const float* grad_scale, const float* found_inf, bool maximize,
                 cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned int>(num_chunks));
#define PYOPTIM_LAUNCH(AMS, DEC) \
  adam_kernel<T, AMS, DEC><<<grid, kBlockSize, 0, stream>>>(meta, lr_tensor, grad_scale, found_inf, maximize)
  if (amsgrad) {
    decoupled ? PYOPTIM_LAUNCH(true, true) : PYOPTIM_LAUNCH(true, false);
  } else {
    decoupled ? PYOPTIM_LAUNCH(false, true) : PYOPTIM_LAUNCH(false, false);
  }
#undef PYOPTIM_LAUNCH
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                    at::ArrayRef<double> lr, at::ArrayRef<double> beta1, at::ArrayRef<double> beta2,
                    at::ArrayRef<double> weight_decay, at::ArrayRef<double> eps, at::IntArrayRef group_sizes,
                    bool amsgrad, bool maximize, bool decoupled_weight_decay,
                    const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf) {
  const AdamArgs args{params, grads,        exp_avgs,     exp_avg_sqs, max_exp_avg_sqs,
                      state_steps, lr,      beta1,        beta2,       weight_decay,
                      eps,    group_sizes,  amsgrad,      maximize,    decoupled_weight_decay,
                      lr_tensor, grad_scale, found_inf};
  check_adam_args(args, c10::DeviceType::CUDA);
  if (params.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AdamWork work = prepare_adam_work(args);
  const double* lr_ptr = lr_tensor.has_value() ? lr_tensor->const_data_ptr<double>() : nullptr;
  const float* scale_ptr = grad_scale.has_value() ? grad_scale->const_data_ptr<float>() : nullptr;
  const float* inf_ptr = found_inf.has_value() ? found_inf->const_data_ptr<float>() : nullptr;

  const auto plan = plan_launch_groups(work.numel, kChunkSize, kMaxTensors,
                                       std::numeric_limits<int32_t>::max(), work.group_of, kMaxGroups);
  for (const LaunchGroup& launch : plan) {
    AdamLaunchMeta meta{};
    meta.num_tensors = static_cast<int32_t>(launch.num_tensors);
    meta.group_base = static_cast<int32_t>(work.group_of[launch.first_tensor]);
    for (const auto s : c10::irange(launch.num_tensors)) {
      const int64_t i = launch.first_tensor + s;
      meta.p[s] = work.p[i].data_ptr();
      meta.g[s] = work.g[i].const_data_ptr();
      meta.m[s] = work.m[i].data_ptr();
      meta.v[s] = work.v[i].data_ptr();
      meta.vm[s] = amsgrad ? work.vm[i].data_ptr() : nullptr;
      meta.step[s] = state_steps[i].data_ptr<float>();
      meta.numel[s] = work.numel[i];
      meta.chunk_prefix[s] = static_cast<int32_t>(launch.chunk_prefix[s]);
      const int64_t local = work.group_of[i] - meta.group_base;
      TORCH_INTERNAL_ASSERT(local >= 0 && local < kMaxGroups);
      meta.group[s] = static_cast<uint8_t>(local);
      meta.hyper[local] = work.hyper[work.group_of[i]];
    }
    meta.chunk_prefix[launch.num_tensors] = static_cast<int32_t>(launch.num_chunks());

    const int count_blocks = static_cast<int>(ceil_div(launch.num_tensors, 256));
    adam_step_count_kernel<<<count_blocks, 256, 0, stream>>>(meta, inf_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (launch.num_chunks() == 0) {
      continue;
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "adam_step_cuda", [&] {
      launch_adam<scalar_t>(meta, launch.num_chunks(), amsgrad, decoupled_weight_decay, lr_ptr, scale_ptr,
                            inf_ptr, maximize, stream);
    });
  }
  work.finish();
}

}  // namespace pyoptim::cuda

TORCH_LIBRARY_IMPL(pyoptim, CUDA, m) {
  m.impl("adam_step_", &pyoptim::cuda::adam_step_cuda);
}
