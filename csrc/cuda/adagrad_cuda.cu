// adagrad_step_ on CUDA tensors: a chunked multi-tensor launch
// (multi_tensor_apply.cuh) of the per-element math in
// csrc/include/pyoptim/adagrad.h, the code the CPU tests run. As adam_cuda.cu,
// a small kernel advances the steps of each launch before its update reads them.
#include <type_traits>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <pyoptim/adagrad.h>
#include <pyoptim/clip.h>
#include <pyoptim/multi_tensor.h>
#include <pyoptim/precision.h>

#include "../optim_host.h"
#include "../step_ops.h"
#include "multi_tensor_apply.cuh"
#include "step_aux.cuh"

namespace pyoptim::cuda {

namespace {

struct AdagradExtra {
  AdagradHyper hyper[kMaxGroups];
  MasterWeights policy;
  int64_t seed;  // stochastic_seed (kStochastic)
};
// Lists: p, g, sum, step, extra (fp32 masters or int16 remainders).
using AdagradMeta = MultiTensorMeta<5, AdagradExtra>;

template <typename T>
struct AdagradFunctor {
  StepDeviceAux aux;

  __device__ __forceinline__ void operator()(const AdagradMeta& meta, int slot, int64_t begin, int64_t end) const {
    using S = at::opmath_type<T>;
    if (aux.skip()) {
      return;
    }
    const int k = meta.group[slot];
    const double step = *static_cast<const float*>(meta.ptr[3][slot]);
    const AdagradCoeffs<S> coeffs(adagrad_scalars<S>(
        meta.extra.hyper[k], aux.lr(meta.group_base, k, meta.extra.hyper[k].lr), step, aux.grad_mul()));
    T* const ptr[3] = {static_cast<T*>(meta.ptr[0][slot]), static_cast<T*>(meta.ptr[1][slot]),
                       static_cast<T*>(meta.ptr[2][slot])};
    elementwise_chunk<T, 3, 0b111u, 0b101u>(ptr, begin, end,  // g never written
                                            [&](S(&x)[3]) { adagrad_update(x[0], x[1], x[2], coeffs); });
  }
};

// The precision path (note [precision policy] in pyoptim/optim/_base.py): params of storage type T, sum of
// storage type U, the param's fp32 value read and written by precision.h's load_master / store_master, element
// by element (as adam_cuda.cu's AdamMixedFunctor).
template <typename T, typename U>
struct AdagradMixedFunctor {
  StepDeviceAux aux;

  __device__ __forceinline__ void operator()(const AdagradMeta& meta, int slot, int64_t begin, int64_t end) const {
    if (aux.skip()) {
      return;
    }
    const int k = meta.group[slot];
    const double step = *static_cast<const float*>(meta.ptr[3][slot]);
    const AdagradCoeffs<float> c(adagrad_scalars<float>(
        meta.extra.hyper[k], aux.lr(meta.group_base, k, meta.extra.hyper[k].lr), step, aux.grad_mul()));
    const MasterWeights policy = meta.extra.policy;
    const uint32_t key = slot_key<3>(meta, slot);
    T* const p = static_cast<T*>(meta.ptr[0][slot]);
    const T* const g = static_cast<const T*>(meta.ptr[1][slot]);
    U* const sum = static_cast<U*>(meta.ptr[2][slot]);
    void* const extra = meta.ptr[4][slot];
    for (int64_t j = begin + threadIdx.x; j < end; j += kBlockSize) {
      float x = load_master(policy, p, extra, j);
      float s = static_cast<float>(sum[j]);
      adagrad_update(x, static_cast<float>(g[j]), s, c);
      store_master(policy, p, extra, key, j, x);
      sum[j] = static_cast<U>(s);
    }
  }
};

}  // namespace

void adagrad_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                       at::TensorList state_steps, at::ArrayRef<double> lr, at::ArrayRef<double> lr_decay,
                       at::ArrayRef<double> weight_decay, at::ArrayRef<double> eps,
                       at::ArrayRef<double> l1_weight_decay, at::IntArrayRef group_sizes, bool maximize,
                       const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
                       const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& grad_norm,
                       double max_grad_norm, std::optional<at::TensorList> master_params,
                       std::optional<at::TensorList> param_remainders, std::optional<int64_t> stochastic_seed) {
  const AdagradArgs args{params, grads, state_sums, state_steps, lr, lr_decay, weight_decay, eps, l1_weight_decay,
                         group_sizes, maximize, StepAux{lr_tensor, grad_scale, found_inf, grad_norm, max_grad_norm},
                         PrecisionArgs{master_params, param_remainders, stochastic_seed}};
  const TensorScan scan = check_adagrad_args(args, c10::DeviceType::CUDA);
  if (params.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::TensorList extra = args.precision.extra();
  const auto policy = static_cast<MasterWeights>(args.precision.policy());
  const at::ScalarType state_dtype = state_sums[0].scalar_type();
  MultiTensorWork work = prepare_work({params, grads, state_sums, extra}, {true, false, true, true}, group_sizes, &scan);
  const StepDeviceAux aux = StepDeviceAux::from(args.aux, maximize);
  auto fill = [&](AdagradMeta& meta, int s, int64_t i) {
    meta.ptr[0][s] = work.lists[0][i].data_ptr();
    meta.ptr[1][s] = const_cast<void*>(work.lists[1][i].const_data_ptr());  // read only
    meta.ptr[2][s] = work.lists[2][i].data_ptr();
    meta.ptr[3][s] = state_steps[i].data_ptr<float>();
    meta.ptr[4][s] = extra.empty() ? nullptr : work.lists[3][i].data_ptr();
    meta.extra.policy = policy;
    meta.extra.seed = stochastic_seed.value_or(0);
    const int64_t k = work.group_of[i];
    meta.extra.hyper[meta.group[s]] =
        AdagradHyper{lr[k], lr_decay[k], weight_decay[k], eps[k], group_l1(l1_weight_decay, k)};
  };
  auto count_steps = [&](const AdagradMeta& meta) {
    step_count_kernel<3><<<static_cast<int>(ceil_div(meta.num_tensors, 256)), 256, 0, stream>>>(meta, aux);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  auto run = [&](auto functor) {
    multi_tensor_apply<5, AdagradExtra>(work.numel, work.group_of, kMaxGroups, stream, fill, count_steps, functor);
  };
  if (policy != MasterWeights::kNone || state_dtype != params[0].scalar_type()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "adagrad_step_cuda", [&] {
      if constexpr (!std::is_same_v<scalar_t, double>) {
        state_dtype == at::kBFloat16 ? run(AdagradMixedFunctor<scalar_t, c10::BFloat16>{aux})
                                     : run(AdagradMixedFunctor<scalar_t, float>{aux});
      }
    });
    work.finish();
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "adagrad_step_cuda", [&] {
    run(AdagradFunctor<scalar_t>{aux});
  });
  work.finish();
}

static_assert(std::is_same_v<decltype(&adagrad_step_cuda), step_ops::Adagrad*>);  // the step plan's call

}  // namespace pyoptim::cuda

TORCH_LIBRARY_IMPL(pyoptim, CUDA, m) {
  m.impl("adagrad_step_", &pyoptim::cuda::adagrad_step_cuda);
}
