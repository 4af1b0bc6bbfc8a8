// rmsprop_step_ on CUDA tensors: a chunked multi-tensor launch
// (multi_tensor_apply.cuh) of the per-element math in
// csrc/include/pyoptim/rmsprop.h, the code the CPU tests run. As adam_cuda.cu,
// a small kernel advances the steps of each launch (torch counts them;
// RMSprop's update reads none).
#include <type_traits>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <pyoptim/clip.h>
#include <pyoptim/multi_tensor.h>
#include <pyoptim/precision.h>
#include <pyoptim/rmsprop.h>

#include "../optim_host.h"
#include "../step_ops.h"
#include "multi_tensor_apply.cuh"
#include "step_aux.cuh"

namespace pyoptim::cuda {

namespace {

struct RmspropExtra {
  RmspropHyper hyper[kMaxGroups];
  MasterWeights policy;
  int64_t seed;  // stochastic_seed (kStochastic)
};
// Lists: p, g, square_avg, grad_avg, momentum_buffer, step, extra (fp32 masters or int16 remainders).
using RmspropMeta = MultiTensorMeta<7, RmspropExtra>;

template <typename T, bool CENTERED, bool MOMENTUM>
struct RmspropFunctor {
  StepDeviceAux aux;

  __device__ __forceinline__ void operator()(const RmspropMeta& meta, int slot, int64_t begin, int64_t end) const {
    using S = at::opmath_type<T>;
    if (aux.skip()) {
      return;
    }
    const int k = meta.group[slot];
    const RmspropCoeffs<S> coeffs(
        rmsprop_scalars<S>(meta.extra.hyper[k], aux.lr(meta.group_base, k, meta.extra.hyper[k].lr), aux.grad_mul()));
    T* const ptr[5] = {static_cast<T*>(meta.ptr[0][slot]), static_cast<T*>(meta.ptr[1][slot]),
                       static_cast<T*>(meta.ptr[2][slot]), static_cast<T*>(meta.ptr[3][slot]),
                       static_cast<T*>(meta.ptr[4][slot])};
    constexpr unsigned kOptional = (CENTERED ? 0b01000u : 0u) | (MOMENTUM ? 0b10000u : 0u);
    constexpr unsigned kLoad = 0b00111u | kOptional;
    constexpr unsigned kStore = 0b00101u | kOptional;  // never g
    elementwise_chunk<T, 5, kLoad, kStore>(ptr, begin, end, [&](S(&x)[5]) {
      rmsprop_update<CENTERED, MOMENTUM>(x[0], x[1], x[2], x[3], x[4], coeffs);
    });
  }
};

// The precision path (note [precision policy] in pyoptim/optim/_base.py): params of storage type T, the state
// (square_avg, grad_avg, momentum_buffer) of storage type U, the param's fp32 value read and written by
// precision.h's load_master / store_master, element by element (as adam_cuda.cu's AdamMixedFunctor).
template <typename T, typename U, bool CENTERED, bool MOMENTUM>
struct RmspropMixedFunctor {
  StepDeviceAux aux;

  __device__ __forceinline__ void operator()(const RmspropMeta& meta, int slot, int64_t begin, int64_t end) const {
    if (aux.skip()) {
      return;
    }
    const int k = meta.group[slot];
    const RmspropCoeffs<float> c(rmsprop_scalars<float>(
        meta.extra.hyper[k], aux.lr(meta.group_base, k, meta.extra.hyper[k].lr), aux.grad_mul()));
    const MasterWeights policy = meta.extra.policy;
    const uint32_t key = slot_key<5>(meta, slot);
    T* const p = static_cast<T*>(meta.ptr[0][slot]);
    const T* const g = static_cast<const T*>(meta.ptr[1][slot]);
    U* const sa = static_cast<U*>(meta.ptr[2][slot]);
    U* const ga = static_cast<U*>(meta.ptr[3][slot]);
    U* const buf = static_cast<U*>(meta.ptr[4][slot]);
    void* const extra = meta.ptr[6][slot];
    for (int64_t j = begin + threadIdx.x; j < end; j += kBlockSize) {
      float x = load_master(policy, p, extra, j);
      float s = static_cast<float>(sa[j]);
      float a = CENTERED ? static_cast<float>(ga[j]) : 0.0f;
      float b = MOMENTUM ? static_cast<float>(buf[j]) : 0.0f;
      rmsprop_update<CENTERED, MOMENTUM>(x, static_cast<float>(g[j]), s, a, b, c);
      store_master(policy, p, extra, key, j, x);
      sa[j] = static_cast<U>(s);
      if (CENTERED) {
        ga[j] = static_cast<U>(a);
      }
      if (MOMENTUM) {
        buf[j] = static_cast<U>(b);
      }
    }
  }
};

// The functors with their storage types bound, as the launch's templates of the two flags.
template <typename T>
struct RmspropBound {
  template <bool C, bool M>
  using F = RmspropFunctor<T, C, M>;
};
template <typename T, typename U>
struct RmspropMixedBound {
  template <bool C, bool M>
  using F = RmspropMixedFunctor<T, U, C, M>;
};

// Runs `run` with the functor F<CENTERED, MOMENTUM> for these flags.
template <template <bool, bool> class F, typename Run>
void launch_rmsprop(bool centered, bool has_momentum, const StepDeviceAux& d, const Run& run) {
  if (centered) {
    has_momentum ? run(F<true, true>{d}) : run(F<true, false>{d});
  } else {
    has_momentum ? run(F<false, true>{d}) : run(F<false, false>{d});
  }
}

}  // namespace

void rmsprop_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                       at::TensorList grad_avgs, at::TensorList momentum_buffers, at::TensorList state_steps,
                       at::ArrayRef<double> lr, at::ArrayRef<double> alpha, at::ArrayRef<double> eps,
                       at::ArrayRef<double> weight_decay, at::ArrayRef<double> momentum,
                       at::ArrayRef<double> l1_weight_decay, at::IntArrayRef group_sizes, bool centered,
                       bool maximize, const std::optional<at::Tensor>& lr_tensor,
                       const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                       const std::optional<at::Tensor>& grad_norm, double max_grad_norm,
                       std::optional<at::TensorList> master_params, std::optional<at::TensorList> param_remainders,
                       std::optional<int64_t> stochastic_seed) {
  const RmspropArgs args{params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps, lr, alpha, eps,
                         weight_decay, momentum, l1_weight_decay, group_sizes, centered, maximize,
                         StepAux{lr_tensor, grad_scale, found_inf, grad_norm, max_grad_norm},
                         PrecisionArgs{master_params, param_remainders, stochastic_seed}};
  const TensorScan scan = check_rmsprop_args(args, c10::DeviceType::CUDA);
  if (params.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool has_momentum = !momentum_buffers.empty();
  const at::TensorList extra = args.precision.extra();
  const auto policy = static_cast<MasterWeights>(args.precision.policy());
  const at::ScalarType state_dtype = square_avgs[0].scalar_type();
  MultiTensorWork work = prepare_work(
      {params, grads, square_avgs, centered ? grad_avgs : at::TensorList(), momentum_buffers, extra},
      {true, false, true, true, true, true}, group_sizes, &scan);
  const StepDeviceAux aux = StepDeviceAux::from(args.aux, maximize);
  auto fill = [&](RmspropMeta& meta, int s, int64_t i) {
    meta.ptr[0][s] = work.lists[0][i].data_ptr();
    meta.ptr[1][s] = const_cast<void*>(work.lists[1][i].const_data_ptr());  // read only (kStore)
    meta.ptr[2][s] = work.lists[2][i].data_ptr();
    meta.ptr[3][s] = centered ? work.lists[3][i].data_ptr() : nullptr;
    meta.ptr[4][s] = has_momentum ? work.lists[4][i].data_ptr() : nullptr;
    meta.ptr[5][s] = state_steps[i].data_ptr<float>();
    meta.ptr[6][s] = extra.empty() ? nullptr : work.lists[5][i].data_ptr();
    meta.extra.policy = policy;
    meta.extra.seed = stochastic_seed.value_or(0);
    const int64_t k = work.group_of[i];
    meta.extra.hyper[meta.group[s]] =
        RmspropHyper{lr[k], alpha[k], eps[k], weight_decay[k], momentum[k], group_l1(l1_weight_decay, k)};
  };
  auto count_steps = [&](const RmspropMeta& meta) {
    step_count_kernel<5><<<static_cast<int>(ceil_div(meta.num_tensors, 256)), 256, 0, stream>>>(meta, aux);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  auto run = [&](auto functor) {
    multi_tensor_apply<7, RmspropExtra>(work.numel, work.group_of, kMaxGroups, stream, fill, count_steps, functor);
  };
  if (policy != MasterWeights::kNone || state_dtype != params[0].scalar_type()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "rmsprop_step_cuda", [&] {
      if constexpr (!std::is_same_v<scalar_t, double>) {
        auto dispatch_state = [&](auto u) {
          using U = decltype(u);
          launch_rmsprop<RmspropMixedBound<scalar_t, U>::template F>(centered, has_momentum, aux, run);
        };
        state_dtype == at::kBFloat16 ? dispatch_state(c10::BFloat16()) : dispatch_state(float());
      }
    });
    work.finish();
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "rmsprop_step_cuda", [&] {
    launch_rmsprop<RmspropBound<scalar_t>::template F>(centered, has_momentum, aux, run);
  });
  work.finish();
}

static_assert(std::is_same_v<decltype(&rmsprop_step_cuda), step_ops::Rmsprop*>);  // the step plan's call

}  // namespace pyoptim::cuda

TORCH_LIBRARY_IMPL(pyoptim, CUDA, m) {
  m.impl("rmsprop_step_", &pyoptim::cuda::rmsprop_step_cuda);
}
