// lion_step_ on CUDA tensors: a chunked multi-tensor launch
// (multi_tensor_apply.cuh) of the per-element math in
// csrc/include/pyoptim/lion.h, the code the CPU tests run.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <pyoptim/clip.h>
#include <pyoptim/lion.h>

#include "../optim_host.h"
#include "multi_tensor_apply.cuh"
#include "step_aux.cuh"

namespace pyoptim::cuda {

namespace {

struct LionExtra {
  LionHyper hyper[kMaxGroups];
};
// Lists: p, g, m.
using LionMeta = MultiTensorMeta<3, LionExtra>;

template <typename T>
struct LionFunctor {
  StepDeviceAux aux;

  __device__ __forceinline__ void operator()(const LionMeta& meta, int slot, int64_t begin, int64_t end) const {
    using S = at::opmath_type<T>;
    if (aux.skip()) {
      return;
    }
    const int k = meta.group[slot];
    const LionCoeffs<S> coeffs(
        lion_scalars<S>(meta.extra.hyper[k], aux.lr(meta.group_base, k, meta.extra.hyper[k].lr), aux.grad_mul()));
    T* const ptr[3] = {static_cast<T*>(meta.ptr[0][slot]), static_cast<T*>(meta.ptr[1][slot]),
                       static_cast<T*>(meta.ptr[2][slot])};
    elementwise_chunk<T, 3, 0b111u, 0b101u>(ptr, begin, end,  // g never written
                                            [&](S(&x)[3]) { lion_update(x[0], x[1], x[2], coeffs); });
  }
};

}  // namespace

void lion_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::ArrayRef<double> lr,
                    at::ArrayRef<double> beta1, at::ArrayRef<double> beta2, at::ArrayRef<double> weight_decay,
                    at::ArrayRef<double> l1_weight_decay, at::IntArrayRef group_sizes, bool maximize,
                    const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& grad_norm,
                    double max_grad_norm) {
  const LionArgs args{params, grads, exp_avgs, lr, beta1, beta2, weight_decay, l1_weight_decay, group_sizes, maximize,
                      StepAux{lr_tensor, grad_scale, found_inf, grad_norm, max_grad_norm}};
  check_lion_args(args, c10::DeviceType::CUDA);
  if (params.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  MultiTensorWork work = prepare_work({params, grads, exp_avgs}, {true, false, true}, group_sizes);
  auto fill = [&](LionMeta& meta, int s, int64_t i) {
    meta.ptr[0][s] = work.lists[0][i].data_ptr();
    meta.ptr[1][s] = const_cast<void*>(work.lists[1][i].const_data_ptr());  // read only
    meta.ptr[2][s] = work.lists[2][i].data_ptr();
    const int64_t k = work.group_of[i];
    meta.extra.hyper[meta.group[s]] =
        LionHyper{lr[k], beta1[k], beta2[k], weight_decay[k], group_l1(l1_weight_decay, k)};
  };
  auto nothing_before = [](const LionMeta&) {};
  const StepDeviceAux dev = StepDeviceAux::from(args.aux, maximize);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "lion_step_cuda", [&] {
    multi_tensor_apply<3, LionExtra>(work.numel, work.group_of, kMaxGroups, stream, fill, nothing_before,
                                     LionFunctor<scalar_t>{dev});
  });
  work.finish();
}

}  // namespace pyoptim::cuda

TORCH_LIBRARY_IMPL(pyoptim, CUDA, m) {
  m.impl("lion_step_", &pyoptim::cuda::lion_step_cuda);
}
