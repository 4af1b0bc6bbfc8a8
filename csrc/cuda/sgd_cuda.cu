// sgd_step_ on CUDA tensors: a chunked multi-tensor launch
// (multi_tensor_apply.cuh) of the per-element math in
// csrc/include/pyoptim/sgd.h, the code the CPU tests run.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <pyoptim/clip.h>
#include <pyoptim/sgd.h>

#include "../optim_host.h"
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

// Runs `run` with the functor for these flags.
template <typename T, typename Run>
void launch_sgd(bool has_momentum, bool first_step, bool nesterov, const StepDeviceAux& d, const Run& run) {
  if (!has_momentum) {
    run(SgdFunctor<T, false, false, false>{d});
  } else if (first_step) {
    nesterov ? run(SgdFunctor<T, true, true, true>{d}) : run(SgdFunctor<T, true, false, true>{d});
  } else {
    nesterov ? run(SgdFunctor<T, true, true, false>{d}) : run(SgdFunctor<T, true, false, false>{d});
  }
}

}  // namespace

void sgd_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                   at::ArrayRef<double> lr, at::ArrayRef<double> momentum, at::ArrayRef<double> dampening,
                   at::ArrayRef<double> weight_decay, at::ArrayRef<double> l1_weight_decay, at::IntArrayRef group_sizes,
                   bool nesterov, bool maximize,
                   bool is_first_step, const std::optional<at::Tensor>& lr_tensor,
                   const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                   const std::optional<at::Tensor>& grad_norm, double max_grad_norm) {
  const SgdArgs args{params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, l1_weight_decay,
                     group_sizes, nesterov, maximize, is_first_step,
                     StepAux{lr_tensor, grad_scale, found_inf, grad_norm, max_grad_norm}};
  check_sgd_args(args, c10::DeviceType::CUDA);
  if (params.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  MultiTensorWork work = prepare_work({params, grads, momentum_buffers}, {true, false, true}, group_sizes);
  const bool has_momentum = !momentum_buffers.empty();
  auto fill = [&](SgdMeta& meta, int s, int64_t i) {
    meta.ptr[0][s] = work.lists[0][i].data_ptr();
    meta.ptr[1][s] = const_cast<void*>(work.lists[1][i].const_data_ptr());  // read only (kStore)
    meta.ptr[2][s] = has_momentum ? work.lists[2][i].data_ptr() : nullptr;
    const int64_t k = work.group_of[i];
    meta.extra.hyper[meta.group[s]] =
        SgdHyper{lr[k], momentum[k], dampening[k], weight_decay[k], group_l1(l1_weight_decay, k)};
  };
  auto nothing_before = [](const SgdMeta&) {};
  const StepDeviceAux dev = StepDeviceAux::from(args.aux, maximize);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "sgd_step_cuda", [&] {
    launch_sgd<scalar_t>(has_momentum, is_first_step, nesterov, dev, [&](auto functor) {
      multi_tensor_apply<3, SgdExtra>(work.numel, work.group_of, kMaxGroups, stream, fill, nothing_before, functor);
    });
  });
  work.finish();
}

}  // namespace pyoptim::cuda

TORCH_LIBRARY_IMPL(pyoptim, CUDA, m) {
  m.impl("sgd_step_", &pyoptim::cuda::sgd_step_cuda);
}
