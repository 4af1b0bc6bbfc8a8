// adam_step_ on CUDA tensors: a chunked multi-tensor launch
// (multi_tensor_apply.cuh) of the per-element math in
// csrc/include/pyoptim/adam.h, the code the CPU tests run. Checks and layout
// preparation are adam_host.cpp's, shared with the CPU path. Each launch
// carries its tensors' pointers, sizes, steps and param groups'
// hyperparameters by value, so a captured CUDA graph replays it as is.
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
#include <pyoptim/clip.h>
#include <pyoptim/multi_tensor.h>
#include <pyoptim/precision.h>

#include "../optim_host.h"
#include "../step_ops.h"
#include "multi_tensor_apply.cuh"
#include "step_aux.cuh"

namespace pyoptim::cuda {

namespace {

struct AdamExtra {
  AdamHyper hyper[kMaxGroups];
  MasterWeights policy;
  int64_t seed;  // stochastic_seed (kStochastic)
};
// Lists: p, g, m, v, max_v, step, extra (fp32 masters or int16 remainders).
using AdamMeta = MultiTensorMeta<7, AdamExtra>;

template <typename T, bool AMSGRAD, bool DECOUPLED>
struct AdamFunctor {
  StepDeviceAux aux;

  __device__ __forceinline__ void operator()(const AdamMeta& meta, int slot, int64_t begin, int64_t end) const {
    using S = at::opmath_type<T>;
    if (aux.skip()) {
      return;
    }
    const int k = meta.group[slot];
    const double step = *static_cast<const float*>(meta.ptr[5][slot]);
    const AdamCoeffs<S> coeffs(
        adam_scalars<S>(meta.extra.hyper[k], aux.lr(meta.group_base, k, meta.extra.hyper[k].lr), step, aux.grad_mul()));
    T* const ptr[5] = {static_cast<T*>(meta.ptr[0][slot]), static_cast<T*>(meta.ptr[1][slot]),
                       static_cast<T*>(meta.ptr[2][slot]), static_cast<T*>(meta.ptr[3][slot]),
                       static_cast<T*>(meta.ptr[4][slot])};
    constexpr unsigned kLoad = AMSGRAD ? 0b11111u : 0b01111u;
    constexpr unsigned kStore = AMSGRAD ? 0b11101u : 0b01101u;  // never g
    elementwise_chunk<T, 5, kLoad, kStore>(ptr, begin, end, [&](S(&x)[5]) {
      adam_update<AMSGRAD, DECOUPLED>(x[0], x[1], x[2], x[3], x[4], coeffs);
    });
  }
};

// The precision path (note [precision policy] in pyoptim/optim/_base.py): params
// of storage type T, state of storage type U, the param's fp32 value read
// and written by precision.h's load_master / store_master, element by element.
template <typename T, typename U, bool AMSGRAD, bool DECOUPLED>
struct AdamMixedFunctor {
  StepDeviceAux aux;

  __device__ __forceinline__ void operator()(const AdamMeta& meta, int slot, int64_t begin, int64_t end) const {
    if (aux.skip()) {
      return;
    }
    const int k = meta.group[slot];
    const double step = *static_cast<const float*>(meta.ptr[5][slot]);
    const AdamCoeffs<float> c(
        adam_scalars<float>(meta.extra.hyper[k], aux.lr(meta.group_base, k, meta.extra.hyper[k].lr), step, aux.grad_mul()));
    const MasterWeights policy = meta.extra.policy;
    const uint32_t key = slot_key<5>(meta, slot);
    T* const p = static_cast<T*>(meta.ptr[0][slot]);
    const T* const g = static_cast<const T*>(meta.ptr[1][slot]);
    U* const m = static_cast<U*>(meta.ptr[2][slot]);
    U* const v = static_cast<U*>(meta.ptr[3][slot]);
    U* const vm = static_cast<U*>(meta.ptr[4][slot]);
    void* const extra = meta.ptr[6][slot];
    for (int64_t j = begin + threadIdx.x; j < end; j += kBlockSize) {
      float x = load_master(policy, p, extra, j);
      float mj = static_cast<float>(m[j]);
      float vj = static_cast<float>(v[j]);
      float wj = AMSGRAD ? static_cast<float>(vm[j]) : 0.0f;
      adam_update<AMSGRAD, DECOUPLED>(x, static_cast<float>(g[j]), mj, vj, wj, c);
      store_master(policy, p, extra, key, j, x);
      m[j] = static_cast<U>(mj);
      v[j] = static_cast<U>(vj);
      if (AMSGRAD) {
        vm[j] = static_cast<U>(wj);
      }
    }
  }
};

}  // namespace

void adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                    at::ArrayRef<double> lr, at::ArrayRef<double> beta1, at::ArrayRef<double> beta2,
                    at::ArrayRef<double> weight_decay, at::ArrayRef<double> eps,
                    at::ArrayRef<double> l1_weight_decay, at::IntArrayRef group_sizes,
                    bool amsgrad, bool maximize, bool decoupled_weight_decay,
                    const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& grad_norm,
                    double max_grad_norm, std::optional<at::TensorList> master_params,
                    std::optional<at::TensorList> param_remainders, std::optional<int64_t> stochastic_seed) {
  const AdamArgs args{params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2,
                      weight_decay, eps, l1_weight_decay, group_sizes, amsgrad, maximize, decoupled_weight_decay,
                      StepAux{lr_tensor, grad_scale, found_inf, grad_norm, max_grad_norm},
                      PrecisionArgs{master_params, param_remainders, stochastic_seed}};
  const TensorScan scan = check_adam_args(args, c10::DeviceType::CUDA);
  if (params.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::TensorList extra = args.precision.extra();
  const auto policy = static_cast<MasterWeights>(args.precision.policy());
  const at::ScalarType state_dtype = exp_avgs[0].scalar_type();
  MultiTensorWork work = prepare_work(
      {params, grads, exp_avgs, exp_avg_sqs, amsgrad ? max_exp_avg_sqs : at::TensorList(), extra},
      {true, false, true, true, true, true}, group_sizes, &scan);
  const StepDeviceAux aux = StepDeviceAux::from(args.aux, maximize);

  const int64_t n = static_cast<int64_t>(params.size());
  std::vector<void*> step_ptr(n);
  const DataPrefetch steps_ahead({state_steps});
  for (const auto i : c10::irange(n)) {
    steps_ahead(i);
    step_ptr[i] = state_steps[i].data_ptr<float>();
  }
  const DataPrefetch ahead({params, grads, exp_avgs, exp_avg_sqs, amsgrad ? max_exp_avg_sqs : at::TensorList()});
  auto fill = [&](AdamMeta& meta, int s, int64_t i) {
    ahead(i);
    meta.ptr[0][s] = work.lists[0][i].data_ptr();
    meta.ptr[1][s] = const_cast<void*>(work.lists[1][i].const_data_ptr());  // read only (kStore)
    meta.ptr[2][s] = work.lists[2][i].data_ptr();
    meta.ptr[3][s] = work.lists[3][i].data_ptr();
    meta.ptr[4][s] = amsgrad ? work.lists[4][i].data_ptr() : nullptr;
    meta.ptr[5][s] = step_ptr[i];
    meta.ptr[6][s] = extra.empty() ? nullptr : work.lists[5][i].data_ptr();
    meta.extra.policy = policy;
    meta.extra.seed = stochastic_seed.value_or(0);
    const int64_t k = work.group_of[i];
    meta.extra.hyper[meta.group[s]] =
        AdamHyper{lr[k], beta1[k], beta2[k], eps[k], weight_decay[k], group_l1(l1_weight_decay, k)};
  };
  auto count_steps = [&](const AdamMeta& meta) {
    step_count_kernel<5><<<static_cast<int>(ceil_div(meta.num_tensors, 256)), 256, 0, stream>>>(meta, aux);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  auto run = [&](auto functor) {
    multi_tensor_apply<7, AdamExtra>(work.numel, work.group_of, kMaxGroups, stream, fill, count_steps, functor);
  };
  if (policy != MasterWeights::kNone || state_dtype != params[0].scalar_type()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "adam_step_cuda", [&] {
      if constexpr (!std::is_same_v<scalar_t, double>) {
        auto dispatch_state = [&](auto u) {
          using U = decltype(u);
          if (amsgrad) {
            decoupled_weight_decay ? run(AdamMixedFunctor<scalar_t, U, true, true>{aux})
                                   : run(AdamMixedFunctor<scalar_t, U, true, false>{aux});
          } else {
            decoupled_weight_decay ? run(AdamMixedFunctor<scalar_t, U, false, true>{aux})
                                   : run(AdamMixedFunctor<scalar_t, U, false, false>{aux});
          }
        };
        state_dtype == at::kBFloat16 ? dispatch_state(c10::BFloat16()) : dispatch_state(float());
      }
    });
    work.finish();
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "adam_step_cuda", [&] {
    if (amsgrad) {
      decoupled_weight_decay ? run(AdamFunctor<scalar_t, true, true>{aux})
                             : run(AdamFunctor<scalar_t, true, false>{aux});
    } else {
      decoupled_weight_decay ? run(AdamFunctor<scalar_t, false, true>{aux})
                             : run(AdamFunctor<scalar_t, false, false>{aux});
    }
  });
  work.finish();
}

static_assert(std::is_same_v<decltype(&adam_step_cuda), step_ops::Adam*>);  // the step plan's call

}  // namespace pyoptim::cuda

TORCH_LIBRARY_IMPL(pyoptim, CUDA, m) {
  m.impl("adam_step_", &pyoptim::cuda::adam_step_cuda);
}
