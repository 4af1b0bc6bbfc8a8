// lamb_step_ on CUDA tensors: lamb.h's two passes as chunked multi-tensor
// launches (multi_tensor_apply.cuh), the code the CPU tests run, with the
// norms reduced as multi_tensor_norm reduces them (clip_cuda.cu): each block
// writes its chunk's sums of p * p and u * u to a partials buffer (in
// double), one thread per tensor then adds its chunks' partials in order
// into the tensor's trust ratio, which the second pass reads. Deterministic,
// no atomics, no host sync; every launch's metadata by value, so a captured
// CUDA graph replays it as is. Under a precision policy (note [precision
// policy] in pyoptim/optim/_base.py) p is read through precision.h's
// load_master in both passes and written through store_master by the second.
#include <algorithm>
#include <type_traits>

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
#include <pyoptim/precision.h>

#include "../optim_host.h"
#include "../step_ops.h"
#include "block_reduce.cuh"
#include "multi_tensor_apply.cuh"
#include "step_aux.cuh"

namespace pyoptim::cuda {

namespace {

constexpr int kRatioThreads = 256;

struct LambExtra {
  LambHyper hyper[kMaxGroups];
  int64_t chunk_base;  // index of this launch's first chunk in the partials
  MasterWeights policy;
  int64_t seed;  // stochastic_seed (kStochastic)
};
// Lists: p, g, m, v, step, extra (fp32 masters or int16 remainders; null under the other policies).
using LambMeta = MultiTensorMeta<6, LambExtra>;

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

// The block's sums of p * p and u * u (each thread's partial sums given) to
// partial[2 * chunk], partial[2 * chunk + 1].
__device__ __forceinline__ void write_chunk_sums(const LambMeta& meta, double* partial, double p_sq, double u_sq) {
  const double p_total = block_reduce(p_sq, Sum());
  __syncthreads();  // block_reduce's shared memory is reused
  const double u_total = block_reduce(u_sq, Sum());
  if (threadIdx.x == 0) {
    const int64_t c = meta.extra.chunk_base + blockIdx.x;
    partial[2 * c] = p_total;
    partial[2 * c + 1] = u_total;
  }
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
    write_chunk_sums(meta, partial, p_sq, u_sq);
  }
};

// note [LAMB's fp32 order]: the precision path's first pass visits a chunk's
// elements in the order elementwise_chunk<float> gives each thread over
// 16-byte aligned fp32 arrays (kUnroll vectors of 4 floats, then the tail),
// so its per-thread sums of p * p and u * u, and so the trust ratios, equal
// those of an fp32-param run over the same values: masters under "fp32" and
// "remainder" bit-identical to that run's params.
template <typename Fn>
__device__ __forceinline__ void for_each_in_fp32_order(int64_t begin, int64_t end, const Fn& fn) {
  constexpr int kVec = 4;  // floats per 16-byte vector (elementwise_chunk's kVec for float)
  const int64_t n_vec = (end - begin) / kVec;
  for (int64_t base = threadIdx.x; base < n_vec; base += static_cast<int64_t>(kBlockSize) * kUnroll) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (base + u * kBlockSize < n_vec) {
        const int64_t e = begin + (base + u * kBlockSize) * kVec;
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          fn(e + j);
        }
      }
    }
  }
  for (int64_t j = begin + n_vec * kVec + threadIdx.x; j < end; j += kBlockSize) {
    fn(j);
  }
}

// Pass 1 under a precision policy: params of storage type T, m and v of U; p
// is the master, read (never written) here.
template <typename T, typename U>
struct LambMixedMomentsFunctor {
  StepDeviceAux aux;
  double* partial;

  __device__ __forceinline__ void operator()(const LambMeta& meta, int slot, int64_t begin, int64_t end) const {
    if (aux.skip()) {
      return;
    }
    const LambCoeffs<float> coeffs = lamb_coeffs<float>(meta, slot, aux, 1.0);
    const MasterWeights policy = meta.extra.policy;
    const T* const p = static_cast<const T*>(meta.ptr[0][slot]);
    const T* const g = static_cast<const T*>(meta.ptr[1][slot]);
    U* const m = static_cast<U*>(meta.ptr[2][slot]);
    U* const v = static_cast<U*>(meta.ptr[3][slot]);
    const void* const extra = meta.ptr[5][slot];
    float p_sq = 0.0f, u_sq = 0.0f;
    for_each_in_fp32_order(begin, end, [&](int64_t j) {
      const float x = load_master(policy, p, extra, j);
      float mj = static_cast<float>(m[j]);
      float vj = static_cast<float>(v[j]);
      lamb_moments(x, static_cast<float>(g[j]), mj, vj, coeffs);
      const U ms = static_cast<U>(mj);
      const U vs = static_cast<U>(vj);
      m[j] = ms;
      v[j] = vs;
      // u from m and v as stored (lamb.h)
      const float u = lamb_direction(x, static_cast<float>(ms), static_cast<float>(vs), coeffs);
      p_sq += x * x;
      u_sq += u * u;
    });
    write_chunk_sums(meta, partial, p_sq, u_sq);
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

// Pass 2 under a precision policy: the master moved and written back through store_master.
template <typename T, typename U>
struct LambMixedApplyFunctor {
  StepDeviceAux aux;
  const double* ratio;

  __device__ __forceinline__ void operator()(const LambMeta& meta, int slot, int64_t begin, int64_t end) const {
    if (aux.skip()) {
      return;
    }
    const LambCoeffs<float> coeffs = lamb_coeffs<float>(meta, slot, aux, ratio[meta.first_tensor + slot]);
    const MasterWeights policy = meta.extra.policy;
    const uint32_t key = slot_key<4>(meta, slot);
    T* const p = static_cast<T*>(meta.ptr[0][slot]);
    const U* const m = static_cast<const U*>(meta.ptr[2][slot]);
    const U* const v = static_cast<const U*>(meta.ptr[3][slot]);
    void* const extra = meta.ptr[5][slot];
    for (int64_t j = begin + threadIdx.x; j < end; j += kBlockSize) {
      float x = load_master(policy, p, extra, j);
      lamb_apply(x, static_cast<float>(m[j]), static_cast<float>(v[j]), coeffs);
      store_master(policy, p, extra, key, j, x);
    }
  }
};

// The three ops' work, one launcher: lamb_step_ is lamb_moments_ then
// lamb_apply_ with the norms in between (note [LAMB's two passes]).
enum class LambPass { kStep, kMoments, kApply };

at::Tensor run_lamb(const LambArgs& args, LambPass pass, const at::Tensor* norms) {
  const char* op = pass == LambPass::kStep ? "lamb_step_" : pass == LambPass::kMoments ? "lamb_moments_" : "lamb_apply_";
  const TensorScan scan = check_lamb_args(args, c10::DeviceType::CUDA, op);
  const int64_t n = static_cast<int64_t>(args.params.size());
  if (pass == LambPass::kApply) {
    check_lamb_norms(op, *norms, args.params);
  }
  if (args.params.empty()) {
    return pass == LambPass::kMoments ? at::zeros({2, 0}, at::TensorOptions().dtype(at::kDouble)) : at::Tensor();
  }
  const c10::cuda::CUDAGuard guard(args.params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // The masters or remainders are read by both passes (p's fp32 value), written by the second.
  const at::TensorList extra = args.precision.extra();
  const auto policy = static_cast<MasterWeights>(args.precision.policy());
  const at::ScalarType state_dtype = args.exp_avgs[0].scalar_type();
  const bool mixed = policy != MasterWeights::kNone || state_dtype != args.params[0].scalar_type();
  MultiTensorWork work = prepare_work({args.params, args.grads, args.exp_avgs, args.exp_avg_sqs, extra},
                                      {pass != LambPass::kMoments, false, pass != LambPass::kApply,
                                       pass != LambPass::kApply, pass != LambPass::kMoments},
                                      args.group_sizes, &scan);
  const StepDeviceAux aux = StepDeviceAux::from(args.aux, args.maximize);
  auto fill = [&](LambMeta& meta, int s, int64_t i) {
    meta.ptr[0][s] = work.lists[0][i].data_ptr();
    meta.ptr[1][s] = const_cast<void*>(work.lists[1][i].const_data_ptr());  // read only
    meta.ptr[2][s] = work.lists[2][i].data_ptr();
    meta.ptr[3][s] = work.lists[3][i].data_ptr();
    meta.ptr[4][s] = args.state_steps[i].data_ptr<float>();
    meta.ptr[5][s] = extra.empty() ? nullptr : work.lists[4][i].data_ptr();
    meta.extra.policy = policy;
    meta.extra.seed = args.precision.stochastic_seed.value_or(0);
    const int64_t k = work.group_of[i];
    meta.extra.hyper[meta.group[s]] = LambHyper{args.lr[k], args.beta1[k], args.beta2[k], args.eps[k],
                                                args.weight_decay[k], group_l1(args.l1_weight_decay, k)};
  };
  std::vector<LambMeta> metas = build_metas<6, LambExtra>(work.numel, work.group_of, kMaxGroups, fill);
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
  // Every launch of the passes with these two functors.
  auto run = [&](const auto& moments, const auto& apply) {
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
  };
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.params[0].scalar_type(), "lamb_step_cuda", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      if (mixed) {
        auto with_state = [&](auto u) {
          using U = decltype(u);
          run(LambMixedMomentsFunctor<scalar_t, U>{aux, partial.data_ptr<double>()},
              LambMixedApplyFunctor<scalar_t, U>{aux, ratio.const_data_ptr<double>()});
        };
        state_dtype == at::kBFloat16 ? with_state(c10::BFloat16()) : with_state(float());
        return;
      }
    }
    run(LambMomentsFunctor<scalar_t>{aux, partial.data_ptr<double>()},
        LambApplyFunctor<scalar_t>{aux, ratio.const_data_ptr<double>()});
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
                   double max_grad_norm, const std::optional<at::TensorList>& master_params,
                   const std::optional<at::TensorList>& param_remainders,
                   const std::optional<int64_t>& stochastic_seed) {
  return LambArgs{params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, beta1, beta2, weight_decay, eps,
                  l1_weight_decay, group_sizes, maximize,
                  StepAux{lr_tensor, grad_scale, found_inf, grad_norm, max_grad_norm},
                  PrecisionArgs{master_params, param_remainders, stochastic_seed}};
}

}  // namespace

void lamb_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList state_steps, at::ArrayRef<double> lr, at::ArrayRef<double> beta1,
                    at::ArrayRef<double> beta2, at::ArrayRef<double> weight_decay, at::ArrayRef<double> eps,
                    at::ArrayRef<double> l1_weight_decay, at::IntArrayRef group_sizes, bool maximize,
                    const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& grad_norm,
                    double max_grad_norm, std::optional<at::TensorList> master_params,
                    std::optional<at::TensorList> param_remainders, std::optional<int64_t> stochastic_seed) {
  run_lamb(lamb_args(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, beta1, beta2, weight_decay, eps,
                     l1_weight_decay, group_sizes, maximize, lr_tensor, grad_scale, found_inf, grad_norm,
                     max_grad_norm, master_params, param_remainders, stochastic_seed),
           LambPass::kStep, nullptr);
}

at::Tensor lamb_moments_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                             at::TensorList exp_avg_sqs, at::TensorList state_steps, at::ArrayRef<double> lr,
                             at::ArrayRef<double> beta1, at::ArrayRef<double> beta2,
                             at::ArrayRef<double> weight_decay, at::ArrayRef<double> eps,
                             at::ArrayRef<double> l1_weight_decay, at::IntArrayRef group_sizes, bool maximize,
                             const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
                             const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& grad_norm,
                             double max_grad_norm, std::optional<at::TensorList> master_params,
                             std::optional<at::TensorList> param_remainders,
                             std::optional<int64_t> stochastic_seed) {
  return run_lamb(lamb_args(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, beta1, beta2, weight_decay, eps,
                            l1_weight_decay, group_sizes, maximize, lr_tensor, grad_scale, found_inf, grad_norm,
                            max_grad_norm, master_params, param_remainders, stochastic_seed),
                  LambPass::kMoments, nullptr);
}

void lamb_apply_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                     at::TensorList state_steps, const at::Tensor& norms, at::ArrayRef<double> lr,
                     at::ArrayRef<double> beta1, at::ArrayRef<double> beta2, at::ArrayRef<double> weight_decay,
                     at::ArrayRef<double> eps, at::ArrayRef<double> l1_weight_decay, at::IntArrayRef group_sizes,
                     bool maximize, const std::optional<at::Tensor>& lr_tensor,
                     const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                     const std::optional<at::Tensor>& grad_norm, double max_grad_norm,
                     std::optional<at::TensorList> master_params, std::optional<at::TensorList> param_remainders,
                     std::optional<int64_t> stochastic_seed) {
  run_lamb(lamb_args(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, beta1, beta2, weight_decay, eps,
                     l1_weight_decay, group_sizes, maximize, lr_tensor, grad_scale, found_inf, grad_norm,
                     max_grad_norm, master_params, param_remainders, stochastic_seed),
           LambPass::kApply, &norms);
}

static_assert(std::is_same_v<decltype(&lamb_step_cuda), step_ops::Lamb*>);  // the step plan's call

}  // namespace pyoptim::cuda

TORCH_LIBRARY_IMPL(pyoptim, CUDA, m) {
  m.impl("lamb_step_", &pyoptim::cuda::lamb_step_cuda);
  m.impl("lamb_moments_", &pyoptim::cuda::lamb_moments_cuda);
  m.impl("lamb_apply_", &pyoptim::cuda::lamb_apply_cuda);
}
