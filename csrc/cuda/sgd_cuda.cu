// sgd_step_ on CUDA tensors: a chunked multi-tensor launch
// (multi_tensor_apply.cuh) of the per-element math in
// csrc/include/pyoptim/sgd.h, the code the CPU tests run.
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
#include <pyoptim/sgd.h>

#include "../optim_host.h"
#include "../step_ops.h"
#include "multi_tensor_apply.cuh"
#include "step_aux.cuh"

namespace pyoptim::cuda {

namespace {

struct SgdExtra {
  SgdHyper hyper[kMaxGroups];
};
// Lists: p, g, momentum buffer.
using SgdMeta = MultiTensorMeta<3, SgdExtra>;

template <typename T, bool MOMENTUM, bool NESTEROV, bool FIRST_STEP>
struct SgdFunctor {
  StepDeviceAux aux;

  __device__ __forceinline__ void operator()(const SgdMeta& meta, int slot, int64_t begin, int64_t end) const {
    using S = at::opmath_type<T>;
    if (aux.skip()) {
      return;
    }
    const int k = meta.group[slot];
    const SgdCoeffs<S> coeffs(
        sgd_scalars<S>(meta.extra.hyper[k], aux.lr(meta.group_base, k, meta.extra.hyper[k].lr), aux.grad_mul()));
    T* const ptr[3] = {static_cast<T*>(meta.ptr[0][slot]), static_cast<T*>(meta.ptr[1][slot]),
                       static_cast<T*>(meta.ptr[2][slot])};
    constexpr unsigned kLoad = MOMENTUM && !FIRST_STEP ? 0b111u : 0b011u;
    constexpr unsigned kStore = MOMENTUM ? 0b101u : 0b001u;  // never g
    elementwise_chunk<T, 3, kLoad, kStore>(ptr, begin, end, [&](S(&x)[3]) {
      sgd_update<MOMENTUM, NESTEROV, FIRST_STEP>(x[0], x[1], x[2], coeffs);
    });
  }
};

struct SgdMixedExtra {
  SgdHyper hyper[kMaxGroups];
  MasterWeights policy;
  int64_t seed;  // stochastic_seed (kStochastic)
};
// Lists: p, g, momentum buffer, step (kStochastic), extra (fp32 masters or int16 remainders).
using SgdMixedMeta = MultiTensorMeta<5, SgdMixedExtra>;

// The precision path (note [precision policy] in pyoptim/optim/_base.py): params of storage type T, the
// momentum buffer of storage type U, the param's fp32 value read and written by precision.h's load_master /
// store_master, element by element (as adam_cuda.cu's AdamMixedFunctor).
template <typename T, typename U, bool MOMENTUM, bool NESTEROV, bool FIRST_STEP>
struct SgdMixedFunctor {
  StepDeviceAux aux;

  __device__ __forceinline__ void operator()(const SgdMixedMeta& meta, int slot, int64_t begin, int64_t end) const {
    if (aux.skip()) {
      return;
    }
    const int k = meta.group[slot];
    const SgdCoeffs<float> c(
        sgd_scalars<float>(meta.extra.hyper[k], aux.lr(meta.group_base, k, meta.extra.hyper[k].lr), aux.grad_mul()));
    const MasterWeights policy = meta.extra.policy;
    const uint32_t key = slot_key<3>(meta, slot);
    T* const p = static_cast<T*>(meta.ptr[0][slot]);
    const T* const g = static_cast<const T*>(meta.ptr[1][slot]);
    U* const buf = static_cast<U*>(meta.ptr[2][slot]);
    void* const extra = meta.ptr[4][slot];
    for (int64_t j = begin + threadIdx.x; j < end; j += kBlockSize) {
      float x = load_master(policy, p, extra, j);
      float b = MOMENTUM && !FIRST_STEP ? static_cast<float>(buf[j]) : 0.0f;
      sgd_update<MOMENTUM, NESTEROV, FIRST_STEP>(x, static_cast<float>(g[j]), b, c);
      store_master(policy, p, extra, key, j, x);
      if (MOMENTUM) {
        buf[j] = static_cast<U>(b);
      }
    }
  }
};

// The functors with their storage types bound, as launch_sgd's templates of the three flags.
template <typename T>
struct SgdBound {
  template <bool M, bool N, bool F1>
  using F = SgdFunctor<T, M, N, F1>;
};
template <typename T, typename U>
struct SgdMixedBound {
  template <bool M, bool N, bool F1>
  using F = SgdMixedFunctor<T, U, M, N, F1>;
};

// Runs `run` with the functor F<MOMENTUM, NESTEROV, FIRST_STEP> for these flags.
template <template <bool, bool, bool> class F, typename Run>
void launch_sgd(bool has_momentum, bool first_step, bool nesterov, const StepDeviceAux& d, const Run& run) {
  if (!has_momentum) {
    run(F<false, false, false>{d});
  } else if (first_step) {
    nesterov ? run(F<true, true, true>{d}) : run(F<true, false, true>{d});
  } else {
    nesterov ? run(F<true, true, false>{d}) : run(F<true, false, false>{d});
  }
}

}  // namespace

void sgd_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                   at::ArrayRef<double> lr, at::ArrayRef<double> momentum, at::ArrayRef<double> dampening,
                   at::ArrayRef<double> weight_decay, at::ArrayRef<double> l1_weight_decay, at::IntArrayRef group_sizes,
                   bool nesterov, bool maximize, bool is_first_step, const std::optional<at::Tensor>& lr_tensor,
                   const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                   const std::optional<at::Tensor>& grad_norm, double max_grad_norm,
                   std::optional<at::TensorList> master_params, std::optional<at::TensorList> param_remainders,
                   std::optional<int64_t> stochastic_seed, std::optional<at::TensorList> state_steps) {
  const SgdArgs args{params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, l1_weight_decay,
                     group_sizes, nesterov, maximize, is_first_step,
                     StepAux{lr_tensor, grad_scale, found_inf, grad_norm, max_grad_norm},
                     PrecisionArgs{master_params, param_remainders, stochastic_seed}, state_steps};
  const TensorScan scan = check_sgd_args(args, c10::DeviceType::CUDA);
  if (params.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::TensorList extra = args.precision.extra();
  const auto policy = static_cast<MasterWeights>(args.precision.policy());
  MultiTensorWork work =
      prepare_work({params, grads, momentum_buffers, extra}, {true, false, true, true}, group_sizes, &scan);
  const bool has_momentum = !momentum_buffers.empty();
  const StepDeviceAux dev = StepDeviceAux::from(args.aux, maximize);
  const at::ScalarType state_dtype = has_momentum ? momentum_buffers[0].scalar_type() : params[0].scalar_type();
  const DataPrefetch ahead({params, grads, momentum_buffers, state_steps.value_or(at::TensorList())});
  auto fill = [&](auto& meta, int s, int64_t i) {
    ahead(i);
    meta.ptr[0][s] = work.lists[0][i].data_ptr();
    meta.ptr[1][s] = const_cast<void*>(work.lists[1][i].const_data_ptr());  // read only (kStore)
    meta.ptr[2][s] = has_momentum ? work.lists[2][i].data_ptr() : nullptr;
    const int64_t k = work.group_of[i];
    meta.extra.hyper[meta.group[s]] =
        SgdHyper{lr[k], momentum[k], dampening[k], weight_decay[k], group_l1(l1_weight_decay, k)};
  };
  if (policy != MasterWeights::kNone || state_dtype != params[0].scalar_type()) {
    auto fill_mixed = [&](SgdMixedMeta& meta, int s, int64_t i) {
      fill(meta, s, i);
      meta.ptr[3][s] = state_steps ? (*state_steps)[i].data_ptr() : nullptr;
      meta.ptr[4][s] = extra.empty() ? nullptr : work.lists[3][i].data_ptr();
      meta.extra.policy = policy;
      meta.extra.seed = stochastic_seed.value_or(0);
    };
    auto count_steps = [&](const SgdMixedMeta& meta) {
      if (state_steps) {
        step_count_kernel<3><<<static_cast<int>(ceil_div(meta.num_tensors, 256)), 256, 0, stream>>>(meta, dev);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    };
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "sgd_step_cuda", [&] {
      if constexpr (!std::is_same_v<scalar_t, double>) {
        auto dispatch_state = [&](auto u) {
          using U = decltype(u);
          launch_sgd<SgdMixedBound<scalar_t, U>::template F>(has_momentum, is_first_step, nesterov, dev,
                                                             [&](auto functor) {
            multi_tensor_apply<5, SgdMixedExtra>(work.numel, work.group_of, kMaxGroups, stream, fill_mixed,
                                                 count_steps, functor);
          });
        };
        state_dtype == at::kBFloat16 ? dispatch_state(c10::BFloat16()) : dispatch_state(float());
      }
    });
    work.finish();
    return;
  }
  auto fill_plain = [&](SgdMeta& meta, int s, int64_t i) { fill(meta, s, i); };
  auto nothing_before = [](const SgdMeta&) {};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "sgd_step_cuda", [&] {
    launch_sgd<SgdBound<scalar_t>::template F>(has_momentum, is_first_step, nesterov, dev, [&](auto functor) {
      multi_tensor_apply<3, SgdExtra>(work.numel, work.group_of, kMaxGroups, stream, fill_plain, nothing_before,
                                      functor);
    });
  });
  work.finish();
}

static_assert(std::is_same_v<decltype(&sgd_step_cuda), step_ops::Sgd*>);  // the step plan's call

}  // namespace pyoptim::cuda

TORCH_LIBRARY_IMPL(pyoptim, CUDA, m) {
  m.impl("sgd_step_", &pyoptim::cuda::sgd_step_cuda);
}
