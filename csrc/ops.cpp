// Every op's schema, in one TORCH_LIBRARY block. Backends register their
// kernels with TORCH_LIBRARY_IMPL at the foot of the file that holds them
// (csrc/cpu, csrc/cuda); fake kernels and the Python API are in pyoptim/.
#include <Python.h>

#include <string>
#include <vector>

#include <torch/library.h>

#include "cpu/cpu_isa.h"
#include "step_plan.h"

namespace pyoptim {
namespace {

// The instruction set the CPU kernels run with here (DEFAULT, AVX2, AVX512).
std::string cpu_capability() { return cpu::cpu_isa_name(); }

// The archs the CUDA kernels were built for (TORCH_CUDA_ARCH_LIST at build
// time, as 80, 90, ...); empty when built without CUDA.
std::vector<int64_t> cuda_archs() { return {PYOPTIM_CUDA_ARCH_LIST}; }

}  // namespace
}  // namespace pyoptim

// The module `pyoptim._C`: `import pyoptim._C` loads this library and runs the
// registrations below (the pytorch/extension-cpp pattern). Its one Python
// binding is the optimizers' step plan (note [step plan]); every op is a
// dispatcher op, torch.ops.pyoptim.*.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "pyoptim's compiled kernels (see torch.ops.pyoptim)", -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr) {
    try {
      pyoptim::bind_step_plan(module);
    } catch (const std::exception& e) {
      Py_DECREF(module);
      PyErr_SetString(PyExc_ImportError, e.what());
      return nullptr;
    }
  }
  return module;
}
}

TORCH_LIBRARY(pyoptim, m) {
  // Build information, for pyoptim.backend_info().
  m.def("_cpu_capability() -> str", &pyoptim::cpu_capability);
  m.def("_cuda_archs() -> int[]", &pyoptim::cuda_archs);

  // One Adam/AdamW step over many tensors of one device and dtype, in place.
  // Mirrors aten::_fused_adam_ (argument names and order), with per-group
  // hyperparameters: tensors [sum(group_sizes[:k]), sum(group_sizes[:k+1]))
  // belong to group k and use lr[k], beta1[k], ... . lr_tensor, when given,
  // holds one lr per group (float64) on the params' device and replaces `lr` (no host
  // sync: capturable). grad_scale divides the grads (GradScaler); a nonzero
  // found_inf makes the whole call a no-op. Advances every state_steps entry
  // by one unless found_inf is nonzero. With grad_norm (the L2 norm of all
  // the grads being clipped, as passed), grads are scaled by
  // min(1, max_grad_norm / (unscaled norm + 1e-6)) inside the kernel, as
  // torch.nn.utils.clip_grad_norm_ would scale them. grads are never written.
  // l1_weight_decay (one per group, or empty: none) adds l1 * sign(p) to the
  // grads right after they are scaled, before weight_decay (math.h's add_l1).
  // The state lists may hold float32 or bfloat16 beside 16-bit and float32
  // params (one state dtype per call). At most one precision policy
  // (csrc/include/pyoptim/precision.h): master_params (float32 masters of
  // fp16/bf16 params: the update runs on them, params get them rounded to
  // nearest), param_remainders (int16: bf16 param + remainder is the fp32
  // master) or stochastic_seed (bf16 params stochastically rounded, the
  // random bits a hash of the seed, the step, the tensor and the element).
  m.def(
      "adam_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] state_steps, *, "
      "float[] lr, float[] beta1, float[] beta2, float[] weight_decay, float[] eps, float[] l1_weight_decay=[], "
      "int[] group_sizes, bool amsgrad, bool maximize, bool decoupled_weight_decay, "
      "Tensor? lr_tensor=None, Tensor? grad_scale=None, Tensor? found_inf=None, "
      "Tensor? grad_norm=None, float max_grad_norm=0.0, Tensor(f!)[]? master_params=None, "
      "Tensor(g!)[]? param_remainders=None, int? stochastic_seed=None) -> ()");

  // One SGD step over many tensors of one device and dtype, in place.
  // Mirrors aten::_fused_sgd_, with per-group hyperparameters as in
  // adam_step_. momentum_buffers is empty when no group has momentum; with
  // is_first_step they are written with the (decayed) grads, as torch's SGD
  // clones the grad into a new buffer. lr_tensor, grad_scale, found_inf,
  // grad_norm, max_grad_norm and l1_weight_decay as in adam_step_; the
  // momentum buffers' dtype and the precision policy (master_params,
  // param_remainders, stochastic_seed) too. SGD keeps no step counter, so
  // stochastic_seed needs state_steps (advanced by one unless found_inf is
  // nonzero): its random bits are a hash of the seed and that step.
  m.def(
      "sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, *, "
      "float[] lr, float[] momentum, float[] dampening, float[] weight_decay, float[] l1_weight_decay=[], "
      "int[] group_sizes, "
      "bool nesterov, bool maximize, bool is_first_step, "
      "Tensor? lr_tensor=None, Tensor? grad_scale=None, Tensor? found_inf=None, "
      "Tensor? grad_norm=None, float max_grad_norm=0.0, Tensor(f!)[]? master_params=None, "
      "Tensor(g!)[]? param_remainders=None, int? stochastic_seed=None, Tensor(e!)[]? state_steps=None) -> ()");

  // One Lion step (Chen et al., 2023) over many tensors of one device and
  // dtype, in place, with per-group hyperparameters as in adam_step_:
  //   p = p * (1 - lr * weight_decay); p -= lr * sign(beta1 * m + (1 - beta1) * g);
  //   m = beta2 * m + (1 - beta2) * g
  // (csrc/include/pyoptim/lion.h). lr_tensor, grad_scale, found_inf,
  // grad_norm, max_grad_norm and l1_weight_decay as in adam_step_; the
  // exp_avgs' dtype and the precision policy (master_params,
  // param_remainders, stochastic_seed) too. Lion keeps no step count, so, as
  // in sgd_step_, stochastic_seed needs state_steps (advanced by one unless
  // found_inf is nonzero), whose values its random bits hash.
  m.def(
      "lion_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, *, "
      "float[] lr, float[] beta1, float[] beta2, float[] weight_decay, float[] l1_weight_decay=[], "
      "int[] group_sizes, bool maximize, "
      "Tensor? lr_tensor=None, Tensor? grad_scale=None, Tensor? found_inf=None, "
      "Tensor? grad_norm=None, float max_grad_norm=0.0, Tensor(f!)[]? master_params=None, "
      "Tensor(g!)[]? param_remainders=None, int? stochastic_seed=None, Tensor(e!)[]? state_steps=None) -> ()");

  // One LAMB step (You et al., 2019) over many tensors of one device and
  // dtype, in place, with per-group hyperparameters as in adam_step_: Adam's
  // moments with bias correction, u = m_hat / (sqrt(v_hat) + eps) + wd * p,
  // and p -= lr * r * u with r = ||p|| / ||u|| per tensor (1 where either is
  // 0), in two passes over memory (csrc/include/pyoptim/lamb.h); the norms'
  // partial sums are reduced in a fixed order (deterministic, no atomics).
  // grad_norm/max_grad_norm is the global clip of the grads before the
  // moments. state_steps, lr_tensor, grad_scale, found_inf and
  // l1_weight_decay as in adam_step_; the moments' dtype and the precision
  // policy (master_params, param_remainders, stochastic_seed) too: p is the
  // fp32 master wherever it is read (weight decay, ||p||), so the trust ratio
  // is the master's, and the second pass writes p through the policy.
  m.def(
      "lamb_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] state_steps, *, "
      "float[] lr, float[] beta1, float[] beta2, float[] weight_decay, float[] eps, float[] l1_weight_decay=[], "
      "int[] group_sizes, bool maximize, "
      "Tensor? lr_tensor=None, Tensor? grad_scale=None, Tensor? found_inf=None, "
      "Tensor? grad_norm=None, float max_grad_norm=0.0, "
      "Tensor(f!)[]? master_params=None, Tensor(g!)[]? param_remainders=None, int? stochastic_seed=None) -> ()");

  // LAMB's two passes as ops of their own (note [LAMB's two passes]), for a
  // caller that reduces the per-tensor norms between them: DTensor shards,
  // whose norms are sums over ranks (pyoptim/_dtensor.py). Both take
  // lamb_step_'s arguments. lamb_moments_ advances the steps, moves m and v
  // and returns the norms: float64 [2, n], row 0 each tensor's ||p||^2, row 1
  // its ||u||^2 (zeros where found_inf is nonzero); lamb_apply_, given such
  // norms, moves p by -lr * r * u with r = lamb_trust_ratio(row 0, row 1),
  // reading the steps, m and v as the first pass left them (grads, grad_scale,
  // grad_norm, maximize and l1_weight_decay, which act on the grads, are not
  // read). lamb_moments_ then lamb_apply_ over the same norms is lamb_step_.
  // lamb_moments_ only reads the masters or remainders (its params are read
  // only); lamb_apply_ writes them with the params.
  m.def(
      "lamb_moments_(Tensor[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] state_steps, *, "
      "float[] lr, float[] beta1, float[] beta2, float[] weight_decay, float[] eps, float[] l1_weight_decay=[], "
      "int[] group_sizes, bool maximize, "
      "Tensor? lr_tensor=None, Tensor? grad_scale=None, Tensor? found_inf=None, "
      "Tensor? grad_norm=None, float max_grad_norm=0.0, "
      "Tensor[]? master_params=None, Tensor[]? param_remainders=None, int? stochastic_seed=None) -> Tensor");
  m.def(
      "lamb_apply_(Tensor(a!)[] params, Tensor[] grads, Tensor[] exp_avgs, Tensor[] exp_avg_sqs, "
      "Tensor[] state_steps, Tensor norms, *, "
      "float[] lr, float[] beta1, float[] beta2, float[] weight_decay, float[] eps, float[] l1_weight_decay=[], "
      "int[] group_sizes, bool maximize, "
      "Tensor? lr_tensor=None, Tensor? grad_scale=None, Tensor? found_inf=None, "
      "Tensor? grad_norm=None, float max_grad_norm=0.0, "
      "Tensor(f!)[]? master_params=None, Tensor(g!)[]? param_remainders=None, int? stochastic_seed=None) -> ()");

  // One Adagrad step over many tensors of one device and dtype, in place.
  // Mirrors aten::_fused_adagrad_ (argument names and order), with per-group
  // hyperparameters as in adam_step_: state_steps advance by one, then
  //   g = g + weight_decay * p; state_sum += g * g;
  //   p -= lr / (1 + (step - 1) * lr_decay) * g / (sqrt(state_sum) + eps)
  // (csrc/include/pyoptim/adagrad.h). lr_tensor, grad_scale, found_inf,
  // grad_norm, max_grad_norm and l1_weight_decay as in adam_step_; the
  // state_sums' dtype and the precision policy (master_params,
  // param_remainders, stochastic_seed, whose bits hash the advanced step) too.
  m.def(
      "adagrad_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state_sums, Tensor(c!)[] state_steps, *, "
      "float[] lr, float[] lr_decay, float[] weight_decay, float[] eps, float[] l1_weight_decay=[], "
      "int[] group_sizes, bool maximize, "
      "Tensor? lr_tensor=None, Tensor? grad_scale=None, Tensor? found_inf=None, "
      "Tensor? grad_norm=None, float max_grad_norm=0.0, Tensor(f!)[]? master_params=None, "
      "Tensor(g!)[]? param_remainders=None, int? stochastic_seed=None) -> ()");

  // One RMSprop step over many tensors of one device and dtype, in place.
  // The lists of torch's _single_tensor_rmsprop, in its order, with
  // per-group hyperparameters as in adam_step_: state_steps advance by one, then
  //   g = g + weight_decay * p; square_avg = alpha * square_avg + (1 - alpha) * g * g;
  //   avg = sqrt(square_avg) + eps, or, centered, grad_avg = lerp(grad_avg, g, 1 - alpha) and
  //   avg = sqrt(square_avg - grad_avg^2) + eps;
  //   p -= lr * g / avg, or, with momentum_buffers, buf = momentum * buf + g / avg and p -= lr * buf
  // (csrc/include/pyoptim/rmsprop.h). grad_avgs is read only when centered;
  // momentum_buffers is empty when no group has momentum. lr_tensor,
  // grad_scale, found_inf, grad_norm, max_grad_norm and l1_weight_decay as in adam_step_;
  // the state's dtype (square_avgs, grad_avgs, momentum_buffers: one for all) and the
  // precision policy (master_params, param_remainders, stochastic_seed, whose bits hash
  // the advanced step) too.
  m.def(
      "rmsprop_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] square_avgs, Tensor(c!)[] grad_avgs, "
      "Tensor(d!)[] momentum_buffers, Tensor(e!)[] state_steps, *, "
      "float[] lr, float[] alpha, float[] eps, float[] weight_decay, float[] momentum, "
      "float[] l1_weight_decay=[], int[] group_sizes, bool centered, bool maximize, "
      "Tensor? lr_tensor=None, Tensor? grad_scale=None, Tensor? found_inf=None, "
      "Tensor? grad_norm=None, float max_grad_norm=0.0, Tensor(f!)[]? master_params=None, "
      "Tensor(g!)[]? param_remainders=None, int? stochastic_seed=None) -> ()");

  // Norms of many tensors of one device and dtype in one pass: the total
  // over all of them (0-d) and one per tensor ([n]), both float32, whatever
  // the tensors' dtype (fp16/bf16 accumulate in fp32 and do not overflow).
  // norm_type: any p > 0, inf included.
  m.def("multi_tensor_norm(Tensor[] tensors, float norm_type) -> (Tensor, Tensor)");

  // Scales every tensor in place by min(1, max_norm / (total_norm + 1e-6)),
  // as torch.nn.utils.clip_grad_norm_ does, reading total_norm (float32, 0-d,
  // on the tensors' device) on the device: no host sync.
  m.def("clip_scale_(Tensor(a!)[] tensors, Tensor total_norm, float max_norm) -> ()");

  // LayerNorm over the trailing dims `normalized_shape` of `input`. Mirrors
  // aten::native_layer_norm: returns (out, mean, rstd), out in input's dtype
  // and contiguous, mean and rstd of shape input.shape[:-len(normalized_shape)]
  // + [1] * len(normalized_shape), in float32 (float64 for float64 input).
  // weight and bias may be float32 for float16/bfloat16 input.
  m.def(
      "layer_norm_fwd(Tensor input, int[] normalized_shape, Tensor? weight, Tensor? bias, float eps) "
      "-> (Tensor, Tensor, Tensor)");
  // Mirrors aten::native_layer_norm_backward: (grad_input, grad_weight,
  // grad_bias); an output masked off by output_mask, or whose weight/bias is
  // None, is an empty tensor (shape [0]) instead of an undefined one. The
  // weight and bias gradients are reduced deterministically (no atomics).
  m.def(
      "layer_norm_bwd(Tensor grad_out, Tensor input, int[] normalized_shape, Tensor mean, Tensor rstd, "
      "Tensor? weight, Tensor? bias, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // RMSNorm; mirrors aten::_fused_rms_norm: returns (out, rstd). eps=None is
  // the epsilon of the math dtype (float's, double's for double input), as
  // in aten's rms_norm.
  m.def("rms_norm_fwd(Tensor input, int[] normalized_shape, Tensor? weight, float? eps) -> (Tensor, Tensor)");
  // Mirrors aten::_fused_rms_norm_backward: (grad_input, grad_weight), with
  // layer_norm_bwd's conventions.
  m.def(
      "rms_norm_bwd(Tensor grad_out, Tensor input, int[] normalized_shape, Tensor rstd, Tensor? weight, "
      "bool[2] output_mask) -> (Tensor, Tensor)");

  // BatchNorm over dim 1 (the C channels) of an (N, C, *) input, read in its
  // own layout: NCHW-contiguous, or channels-last (C innermost, as
  // channels_last / channels_last_3d, or a (N, L, C) tensor seen as (N, C, L));
  // any other layout is made contiguous first. Outputs keep the input's
  // layout. Statistics are per channel over count = numel / C elements, in
  // float32 (float64 for float64 input); weight, bias and running statistics
  // are the input's dtype or float32 (for float16/bfloat16 input).
  //
  // Mirrors aten::native_batch_norm, but functional (note [functional batch
  // norm]: made so while its autograd was a Python formula, which
  // torch.library refuses for a mutating op; kept so, now that the formula is
  // C++ (note [C++ autograd]), because torch.compile traces a functional op
  // as it is, with the caller's copy into the buffers outside it):
  // returns (out, save_mean, save_invstd, new_running_mean, new_running_var).
  //   training: the batch's mean and biased variance normalize; when running
  //     statistics are given, new_running_* are them moved by momentum
  //     ((1 - momentum) * running + momentum * batch, the variance unbiased:
  //     m2 / (count - 1)), in the running statistics' dtype; the caller copies
  //     them back. Otherwise new_running_* are empty (shape [0]).
  //   eval: the running statistics normalize; save_mean is running_mean and
  //     save_invstd 1 / sqrt(running_var + eps), in the statistics' dtype, so
  //     batch_norm_bwd needs neither eps nor the running statistics.
  m.def(
      "batch_norm_fwd(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var, "
      "bool training, float momentum, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Mirrors aten::native_batch_norm_backward with batch_norm_fwd's saved
  // statistics; training says whether they were the batch's (so the input's
  // gradient carries the two per-channel reduction terms). Outputs masked off,
  // or a weight gradient without a weight, are empty tensors (shape [0]);
  // grad_weight and grad_bias are reduced deterministically (no atomics).
  m.def(
      "batch_norm_bwd(Tensor grad_out, Tensor input, Tensor? weight, Tensor save_mean, Tensor save_invstd, "
      "bool training, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  // The pieces SyncBatchNorm runs around its collectives (mirroring
  // aten::batch_norm_stats, batch_norm_elemt, batch_norm_backward_reduce and
  // batch_norm_backward_elemt, with batch_norm_fwd's layouts and dtypes):
  //   batch_norm_stats: per-channel mean and m2 = sum((x - mean)^2) (Welford),
  //     which merge exactly across ranks with uneven counts;
  //   batch_norm_elemt: out = (x - mean) * invstd * weight + bias;
  //   batch_norm_backward_reduce: per-channel sum_dy = sum(dy) and
  //     sum_dy_xmu = sum(dy * (x - mean)), deterministically;
  //   batch_norm_backward_elemt: grad_input =
  //     (dy - mean_dy - (x - mean) * invstd^2 * mean_dy_xmu) * invstd * weight,
  //     with mean_dy = sum_dy / count and mean_dy_xmu = sum_dy_xmu / count over
  //     the global count (the caller divides: no count on the host).
  m.def("batch_norm_stats(Tensor input) -> (Tensor, Tensor)");
  m.def("batch_norm_elemt(Tensor input, Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd) -> Tensor");
  m.def("batch_norm_backward_reduce(Tensor grad_out, Tensor input, Tensor mean) -> (Tensor, Tensor)");
  m.def(
      "batch_norm_backward_elemt(Tensor grad_out, Tensor input, Tensor mean, Tensor invstd, Tensor? weight, "
      "Tensor mean_dy, Tensor mean_dy_xmu) -> Tensor");
}
