// lamb_step_ on CUDA tensors: lamb.h's two passes as chunked multi-tensor
// launches (multi_tensor_apply.cuh), the code the CPU tests run, with the
// norms reduced as multi_tensor_norm reduces them (clip_cuda.cu): each block
// writes its chunk's sums of p * p and u * u to a partials buffer (in
// double), one thread per tensor then adds its chunks' partials in order
// into the tensor's trust ratio, which the second pass reads. Deterministic,
// no atomics, no host sync; every launch's metadata by value, so a captured
// CUDA graph replays it as is.
#include <algorithm>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <pyoptim/clip.h>
#include <pyoptim/lamb.h>
#include <pyoptim/multi_tensor.h>

#include "../optim_host.h"
#include "block_reduce.cuh"
#include "multi_tensor_apply.cuh"
#include "step_aux.cuh"

namespace pyoptim::cuda {

namespace {

constexpr int kRatioThreads = 256;

struct LambExtra {
  LambHyper hyper[kMaxGroups];
  int64_t chunk_base;  // index of this launch's first chunk in the partials
};
// Lists: p, g, m, v, step.
using LambMeta = MultiTensorMeta<5, LambExtra>;

struct Sum {
  __device__ __forceinline__ double operator()(double a, double b) const { return a + b; }
};

template <typename S>
__device__ __forceinline__ LambCoeffs<S> lamb_coeffs(const LambMeta& meta, int slot, const StepDeviceAux& aux,
                                                     double ratio) {
  const int k = meta.group[slot];
  const double step = *static_cast<const float*>(meta.ptr[4][slot]);
  return LambCoeffs<S>(lamb_scalars<S>(meta.extra.hyper[k], aux.lr(meta.group_base, k, meta.extra.hyper[k].lr), step,
                                       aux.grad_mul(), ratio));
}

// Pass 1: m, v written; the chunk's sums of p * p and u * u to
// partial[2 * chunk], partial[2 * chunk + 1].
template <typename T>
struct LambMomentsFunctor {
  StepDeviceAux aux;
  double* partial;

  __device__ __forceinline__ void operator()(const LambMeta& meta, int slot, int64_t begin, int64_t end) const {
    using S = at::opmath_type<T>;
    if (aux.skip()) {
      return;
    }
    const LambCoeffs<S> coeffs = lamb_coeffs<S>(meta, slot, aux, 1.0);
    T* const ptr[4] = {static_cast<T*>(meta.ptr[0][slot]), static_cast<T*>(meta.ptr[1][slot]),
                       static_cast<T*>(meta.ptr[2][slot]), static_cast<T*>(meta.ptr[3][slot])};
    S p_sq = S(0), u_sq = S(0);
    elementwise_chunk<T, 4, 0b1111u, 0b1100u>(ptr, begin, end, [&](S(&x)[4]) {
      lamb_moments(x[0], x[1], x[2], x[3], coeffs);
      // u from m and v as stored (lamb.h)
      const S u = lamb_direction(x[0], static_cast<S>(static_cast<T>(x[2])), static_cast<S>(static_cast<T>(x[3])),
                                 coeffs);
      p_sq += x[0] * x[0];
      u_sq += u * u;
    });
    const double p_total = block_reduce(static_cast<double>(p_sq), Sum());
    __syncthreads();  // block_reduce's shared memory is reused
    const double u_total = block_reduce(static_cast<double>(u_sq), Sum());
    if (threadIdx.x == 0) {
      const int64_t c = meta.extra.chunk_base + blockIdx.x;
      partial[2 * c] = p_total;
      partial[2 * c + 1] = u_total;
    }
  }
};

// One thread per tensor of a launch: its chunks' partials added in order,
// its trust ratio to ratio[tensor] or (lamb_moments_) its squared norms to
// sums[tensor] and sums[n + tensor] (zeros when the step is skipped).
__global__ void lamb_ratio_kernel(const __grid_constant__ LambMeta meta, const double* partial, double* ratio,
                                  double* sums, int64_t n, StepDeviceAux aux) {
  for (int s = blockIdx.x * blockDim.x + threadIdx.x; s < meta.num_tensors; s += gridDim.x * blockDim.x) {
    double p_sq = 0.0, u_sq = 0.0;
    if (!aux.skip()) {
      for (int64_t c = meta.chunk_prefix[s]; c < meta.chunk_prefix[s + 1]; ++c) {
        p_sq += partial[2 * (meta.extra.chunk_base + c)];
        u_sq += partial[2 * (meta.extra.chunk_base + c) + 1];
      }
    }
    if (sums != nullptr) {
      sums[meta.first_tensor + s] = p_sq;
      sums[n + meta.first_tensor + s] = u_sq;
    } else {
      ratio[meta.first_tensor + s] = lamb_trust_ratio(p_sq, u_sq);
    }
  }
}

// lamb_apply_: each tensor's trust ratio from the [2, n] norms it is given.
__global__ void lamb_norms_ratio_kernel(const double* norms, double* ratio, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    ratio[i] = lamb_trust_ratio(norms[i], norms[n + i]);
  }
}

// Pass 2: p moved by -lr * ratio along u (recomputed from the new m, v).
template <typename T>
struct LambApplyFunctor {
  StepDeviceAux aux;
  const double* ratio;

  __device__ __forceinline__ void operator()(const LambMeta& meta, int slot, int64_t begin, int64_t end) const {
    using S = at::opmath_type<T>;
    if (aux.skip()) {
      return;
    }
    const LambCoeffs<S> coeffs = lamb_coeffs<S>(meta, slot, aux, ratio[meta.first_tensor + slot]);
    T* const ptr[4] = {static_cast<T*>(meta.ptr[0][slot]), static_cast<T*>(meta.ptr[1][slot]),
                       static_cast<T*>(meta.ptr[2][slot]), static_cast<T*>(meta.ptr[3][slot])};
    elementwise_chunk<T, 4, 0b1101u, 0b0001u>(ptr, begin, end,
                                              [&](S(&x)[4]) { lamb_apply(x[0], x[2], x[3], coeffs); });
  }
};


// The three ops' work, one launcher: lamb_step_ is lamb_moments_ then
// lamb_apply_ with the norms in between (note [LAMB's two passes]).
enum class LambPass { kStep, kMoments, kApply };

at::Tensor run_lamb(const LambArgs& args, LambPass pass, const at::Tensor* norms) {
  const char* op = pass == LambPass::kStep ? "lamb_step_" : pass == LambPass::kMoments ? "lamb_moments_" : "lamb_apply_";
  check_lamb_args(args, c10::DeviceType::CUDA, op);
  const int64_t n = static_cast<int64_t>(args.params.size());
  if (pass == LambPass::kApply) {
    check_lamb_norms(op, *norms, args.params);
  }
  if (args.params.empty()) {
    return pass == LambPass::kMoments ? at::zeros({2, 0}, at::TensorOptions().dtype(at::kDouble)) : at::Tensor();
  }
  const c10::cuda::CUDAGuard guard(args.params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  MultiTensorWork work = prepare_work({args.params, args.grads, args.exp_avgs, args.exp_avg_sqs},
                                      {pass != LambPass::kMoments, false, pass != LambPass::kApply,
                                       pass != LambPass::kApply},
                                      args.group_sizes);
  const StepDeviceAux aux = StepDeviceAux::from(args.aux, args.maximize);
  auto fill = [&](LambMeta& meta, int s, int64_t i) {
    meta.ptr[0][s] = work.lists[0][i].data_ptr();
    meta.ptr[1][s] = const_cast<void*>(work.lists[1][i].const_data_ptr());  // read only
    meta.ptr[2][s] = work.lists[2][i].data_ptr();
    meta.ptr[3][s] = work.lists[3][i].data_ptr();
    meta.ptr[4][s] = args.state_steps[i].data_ptr<float>();
    const int64_t k = work.group_of[i];
    meta.extra.hyper[meta.group[s]] = LambHyper{args.lr[k], args.beta1[k], args.beta2[k], args.eps[k],
                                                args.weight_decay[k], group_l1(args.l1_weight_decay, k)};
  };
  std::vector<LambMeta> metas = build_metas<5, LambExtra>(work.numel, work.group_of, kMaxGroups, fill);
  int64_t chunks = 0;
  for (auto& meta : metas) {
    meta.extra.chunk_base = chunks;
    chunks += num_chunks(meta);
  }
  const auto f64 = args.params[0].options().dtype(at::kDouble);
  at::Tensor partial = at::empty({std::max<int64_t>(2 * chunks, 1)}, f64);
  at::Tensor ratio = at::empty({n}, f64);
  at::Tensor out = pass == LambPass::kMoments ? at::empty({2, n}, f64) : at::Tensor();
  if (pass == LambPass::kApply) {
    const at::Tensor given = norms->contiguous();
    const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(n, kRatioThreads), 1024));
    lamb_norms_ratio_kernel<<<blocks, kRatioThreads, 0, stream>>>(given.const_data_ptr<double>(),
                                                                  ratio.data_ptr<double>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.params[0].scalar_type(), "lamb_step_cuda", [&] {
    const LambMomentsFunctor<scalar_t> moments{aux, partial.data_ptr<double>()};
    const LambApplyFunctor<scalar_t> apply{aux, ratio.const_data_ptr<double>()};
    for (const LambMeta& meta : metas) {
      const int blocks = static_cast<int>(ceil_div(meta.num_tensors, kRatioThreads));
      if (pass != LambPass::kApply) {
        step_count_kernel<4><<<blocks, kRatioThreads, 0, stream>>>(meta, aux);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        launch_chunks(meta, moments, stream);
        lamb_ratio_kernel<<<blocks, kRatioThreads, 0, stream>>>(
            meta, partial.const_data_ptr<double>(), ratio.data_ptr<double>(),
            pass == LambPass::kMoments ? out.data_ptr<double>() : nullptr, n, aux);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (pass != LambPass::kMoments) {
        launch_chunks(meta, apply, stream);
      }
    }
  });
  work.finish();
  return out;
}

LambArgs lamb_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                   at::TensorList state_steps, at::ArrayRef<double> lr, at::ArrayRef<double> beta1,
                   at::ArrayRef<double> beta2, at::ArrayRef<double> weight_decay, at::ArrayRef<double> eps,
                   at::ArrayRef<double> l1_weight_decay, at::IntArrayRef group_sizes, bool maximize,
                   const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& grad_norm,
                   double max_grad_norm) {
  return LambArgs{params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, beta1, beta2, weight_decay, eps,
                  l1_weight_decay, group_sizes, maximize,
                  StepAux{lr_tensor, grad_scale, found_inf, grad_norm, max_grad_norm}};
}

}  // namespace

void lamb_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList state_steps, at::ArrayRef<double> lr, at::ArrayRef<double> beta1,
                    at::ArrayRef<double> beta2, at::ArrayRef<double> weight_decay, at::ArrayRef<double> eps,
                    at::ArrayRef<double> l1_weight_decay, at::IntArrayRef group_sizes, bool maximize,
                    const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& grad_norm,
                    double max_grad_norm) {
  run_lamb(lamb_args(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, beta1, beta2, weight_decay, eps,
                     l1_weight_decay, group_sizes, maximize, lr_tensor, grad_scale, found_inf, grad_norm,
                     max_grad_norm),
           LambPass::kStep, nullptr);
}

at::Tensor lamb_moments_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                             at::TensorList exp_avg_sqs, at::TensorList state_steps, at::ArrayRef<double> lr,
                             at::ArrayRef<double> beta1, at::ArrayRef<double> beta2,
                             at::ArrayRef<double> weight_decay, at::ArrayRef<double> eps,
                             at::ArrayRef<double> l1_weight_decay, at::IntArrayRef group_sizes, bool maximize,
                             const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
                             const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& grad_norm,
                             double max_grad_norm) {
  return run_lamb(lamb_args(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, beta1, beta2, weight_decay, eps,
                            l1_weight_decay, group_sizes, maximize, lr_tensor, grad_scale, found_inf, grad_norm,
                            max_grad_norm),
                  LambPass::kMoments, nullptr);
}

void lamb_apply_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                     at::TensorList state_steps, const at::Tensor& norms, at::ArrayRef<double> lr,
                     at::ArrayRef<double> beta1, at::ArrayRef<double> beta2, at::ArrayRef<double> weight_decay,
                     at::ArrayRef<double> eps, at::ArrayRef<double> l1_weight_decay, at::IntArrayRef group_sizes,
                     bool maximize, const std::optional<at::Tensor>& lr_tensor,
                     const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                     const std::optional<at::Tensor>& grad_norm, double max_grad_norm) {
  run_lamb(lamb_args(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, beta1, beta2, weight_decay, eps,
                     l1_weight_decay, group_sizes, maximize, lr_tensor, grad_scale, found_inf, grad_norm,
                     max_grad_norm),
           LambPass::kApply, &norms);
}

}  // namespace pyoptim::cuda

TORCH_LIBRARY_IMPL(pyoptim, CUDA, m) {
  m.impl("lamb_step_", &pyoptim::cuda::lamb_step_cuda);
  m.impl("lamb_moments_", &pyoptim::cuda::lamb_moments_cuda);
  m.impl("lamb_apply_", &pyoptim::cuda::lamb_apply_cuda);
}
