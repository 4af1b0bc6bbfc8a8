// rmsprop_step_ on CUDA tensors: a chunked multi-tensor launch
// (multi_tensor_apply.cuh) of the per-element math in
// csrc/include/pyoptim/rmsprop.h, the code the CPU tests run. As adam_cuda.cu,
// a small kernel advances the steps of each launch (torch counts them;
// RMSprop's update reads none).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <pyoptim/clip.h>
#include <pyoptim/multi_tensor.h>
#include <pyoptim/rmsprop.h>

#include "../optim_host.h"
#include "multi_tensor_apply.cuh"
#include "step_aux.cuh"

namespace pyoptim::cuda {

namespace {

struct RmspropExtra {
  RmspropHyper hyper[kMaxGroups];
};
// Lists: p, g, square_avg, grad_avg, momentum_buffer, step.
using RmspropMeta = MultiTensorMeta<6, RmspropExtra>;

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

}  // namespace

void rmsprop_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                       at::TensorList grad_avgs, at::TensorList momentum_buffers, at::TensorList state_steps,
                       at::ArrayRef<double> lr, at::ArrayRef<double> alpha, at::ArrayRef<double> eps,
                       at::ArrayRef<double> weight_decay, at::ArrayRef<double> momentum,
                       at::ArrayRef<double> l1_weight_decay, at::IntArrayRef group_sizes, bool centered,
                       bool maximize, const std::optional<at::Tensor>& lr_tensor,
                       const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                       const std::optional<at::Tensor>& grad_norm, double max_grad_norm) {
  const RmspropArgs args{params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps, lr, alpha, eps,
                         weight_decay, momentum, l1_weight_decay, group_sizes, centered, maximize,
                         StepAux{lr_tensor, grad_scale, found_inf, grad_norm, max_grad_norm}};
  check_rmsprop_args(args, c10::DeviceType::CUDA);
  if (params.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool has_momentum = !momentum_buffers.empty();
  MultiTensorWork work = prepare_work(
      {params, grads, square_avgs, centered ? grad_avgs : at::TensorList(), momentum_buffers},
      {true, false, true, true, true}, group_sizes);
  const StepDeviceAux aux = StepDeviceAux::from(args.aux, maximize);
  auto fill = [&](RmspropMeta& meta, int s, int64_t i) {
    meta.ptr[0][s] = work.lists[0][i].data_ptr();
    meta.ptr[1][s] = const_cast<void*>(work.lists[1][i].const_data_ptr());  // read only (kStore)
    meta.ptr[2][s] = work.lists[2][i].data_ptr();
    meta.ptr[3][s] = centered ? work.lists[3][i].data_ptr() : nullptr;
    meta.ptr[4][s] = has_momentum ? work.lists[4][i].data_ptr() : nullptr;
    meta.ptr[5][s] = state_steps[i].data_ptr<float>();
    const int64_t k = work.group_of[i];
    meta.extra.hyper[meta.group[s]] =
        RmspropHyper{lr[k], alpha[k], eps[k], weight_decay[k], momentum[k], group_l1(l1_weight_decay, k)};
  };
  auto count_steps = [&](const RmspropMeta& meta) {
    step_count_kernel<5><<<static_cast<int>(ceil_div(meta.num_tensors, 256)), 256, 0, stream>>>(meta, aux);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "rmsprop_step_cuda", [&] {
    auto run = [&](auto functor) {
      multi_tensor_apply<6, RmspropExtra>(work.numel, work.group_of, kMaxGroups, stream, fill, count_steps, functor);
    };
    if (centered) {
      has_momentum ? run(RmspropFunctor<scalar_t, true, true>{aux}) : run(RmspropFunctor<scalar_t, true, false>{aux});
    } else {
      has_momentum ? run(RmspropFunctor<scalar_t, false, true>{aux})
                   : run(RmspropFunctor<scalar_t, false, false>{aux});
    }
  });
  work.finish();
}

}  // namespace pyoptim::cuda

TORCH_LIBRARY_IMPL(pyoptim, CUDA, m) {
  m.impl("rmsprop_step_", &pyoptim::cuda::rmsprop_step_cuda);
}
