// lion_step_ on CUDA tensors: a chunked multi-tensor launch
// (multi_tensor_apply.cuh) of the per-element math in
// csrc/include/pyoptim/lion.h, the code the CPU tests run.
#include <type_traits>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <pyoptim/clip.h>
#include <pyoptim/lion.h>
#include <pyoptim/multi_tensor.h>
#include <pyoptim/precision.h>

#include "../optim_host.h"
#include "../step_ops.h"
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

struct LionMixedExtra {
  LionHyper hyper[kMaxGroups];
  MasterWeights policy;
  int64_t seed;  // stochastic_seed (kStochastic)
};
// Lists: p, g, m, step (kStochastic), extra (fp32 masters or int16 remainders).
using LionMixedMeta = MultiTensorMeta<5, LionMixedExtra>;

// The precision path (note [precision policy] in pyoptim/optim/_base.py): params of storage type T, exp_avg of
// storage type U, the param's fp32 value read and written by precision.h's load_master / store_master, element
// by element (as adam_cuda.cu's AdamMixedFunctor).
template <typename T, typename U>
struct LionMixedFunctor {
  StepDeviceAux aux;

  __device__ __forceinline__ void operator()(const LionMixedMeta& meta, int slot, int64_t begin, int64_t end) const {
    if (aux.skip()) {
      return;
    }
    const int k = meta.group[slot];
    const LionCoeffs<float> c(
        lion_scalars<float>(meta.extra.hyper[k], aux.lr(meta.group_base, k, meta.extra.hyper[k].lr), aux.grad_mul()));
    const MasterWeights policy = meta.extra.policy;
    const uint32_t key = slot_key<3>(meta, slot);
    T* const p = static_cast<T*>(meta.ptr[0][slot]);
    const T* const g = static_cast<const T*>(meta.ptr[1][slot]);
    U* const m = static_cast<U*>(meta.ptr[2][slot]);
    void* const extra = meta.ptr[4][slot];
    for (int64_t j = begin + threadIdx.x; j < end; j += kBlockSize) {
      float x = load_master(policy, p, extra, j);
      float mj = static_cast<float>(m[j]);
      lion_update(x, static_cast<float>(g[j]), mj, c);
      store_master(policy, p, extra, key, j, x);
      m[j] = static_cast<U>(mj);
    }
  }
};

}  // namespace

void lion_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::ArrayRef<double> lr,
                    at::ArrayRef<double> beta1, at::ArrayRef<double> beta2, at::ArrayRef<double> weight_decay,
                    at::ArrayRef<double> l1_weight_decay, at::IntArrayRef group_sizes, bool maximize,
                    const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& grad_norm,
                    double max_grad_norm, std::optional<at::TensorList> master_params,
                    std::optional<at::TensorList> param_remainders, std::optional<int64_t> stochastic_seed,
                    std::optional<at::TensorList> state_steps) {
  const LionArgs args{params, grads, exp_avgs, lr, beta1, beta2, weight_decay, l1_weight_decay, group_sizes, maximize,
                      StepAux{lr_tensor, grad_scale, found_inf, grad_norm, max_grad_norm},
                      PrecisionArgs{master_params, param_remainders, stochastic_seed}, state_steps};
  const TensorScan scan = check_lion_args(args, c10::DeviceType::CUDA);
  if (params.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::TensorList extra = args.precision.extra();
  const auto policy = static_cast<MasterWeights>(args.precision.policy());
  const at::ScalarType state_dtype = exp_avgs[0].scalar_type();
  MultiTensorWork work = prepare_work({params, grads, exp_avgs, extra}, {true, false, true, true}, group_sizes, &scan);
  const StepDeviceAux dev = StepDeviceAux::from(args.aux, maximize);
  auto fill = [&](auto& meta, int s, int64_t i) {
    meta.ptr[0][s] = work.lists[0][i].data_ptr();
    meta.ptr[1][s] = const_cast<void*>(work.lists[1][i].const_data_ptr());  // read only
    meta.ptr[2][s] = work.lists[2][i].data_ptr();
    const int64_t k = work.group_of[i];
    meta.extra.hyper[meta.group[s]] =
        LionHyper{lr[k], beta1[k], beta2[k], weight_decay[k], group_l1(l1_weight_decay, k)};
  };
  if (policy != MasterWeights::kNone || state_dtype != params[0].scalar_type()) {
    auto fill_mixed = [&](LionMixedMeta& meta, int s, int64_t i) {
      fill(meta, s, i);
      meta.ptr[3][s] = state_steps ? (*state_steps)[i].data_ptr() : nullptr;
      meta.ptr[4][s] = extra.empty() ? nullptr : work.lists[3][i].data_ptr();
      meta.extra.policy = policy;
      meta.extra.seed = stochastic_seed.value_or(0);
    };
    auto count_steps = [&](const LionMixedMeta& meta) {
      if (state_steps) {
        step_count_kernel<3><<<static_cast<int>(ceil_div(meta.num_tensors, 256)), 256, 0, stream>>>(meta, dev);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    };
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "lion_step_cuda", [&] {
      if constexpr (!std::is_same_v<scalar_t, double>) {
        auto run = [&](auto functor) {
          multi_tensor_apply<5, LionMixedExtra>(work.numel, work.group_of, kMaxGroups, stream, fill_mixed,
                                                count_steps, functor);
        };
        state_dtype == at::kBFloat16 ? run(LionMixedFunctor<scalar_t, c10::BFloat16>{dev})
                                     : run(LionMixedFunctor<scalar_t, float>{dev});
      }
    });
    work.finish();
    return;
  }
  auto fill_plain = [&](LionMeta& meta, int s, int64_t i) { fill(meta, s, i); };
  auto nothing_before = [](const LionMeta&) {};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "lion_step_cuda", [&] {
    multi_tensor_apply<3, LionExtra>(work.numel, work.group_of, kMaxGroups, stream, fill_plain, nothing_before,
                                     LionFunctor<scalar_t>{dev});
  });
  work.finish();
}

static_assert(std::is_same_v<decltype(&lion_step_cuda), step_ops::Lion*>);  // the step plan's call

}  // namespace pyoptim::cuda

TORCH_LIBRARY_IMPL(pyoptim, CUDA, m) {
  m.impl("lion_step_", &pyoptim::cuda::lion_step_cuda);
}
