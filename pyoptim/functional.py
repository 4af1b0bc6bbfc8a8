"""The ops as functions, with backend selection, their fake kernels and autograd.

Each function here is the public entry of one op (torch.ops.pyoptim.<name>);
the optimizers and clipping utilities call these. `layer_norm`, `rms_norm`,
`batch_norm` and `instance_norm` are the differentiable entries of the norm
ops (pyoptim.nn.functional re-exports them; pyoptim.nn's modules call them).
Which backend serves a call is pyoptim._backends' decision.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence, Union

import torch

from pyoptim import _backends
from pyoptim._validation import (FLOAT_DTYPES, batch_norm_layout, check_adagrad_args, check_adam_args,
                                 check_batch_norm_backward_elemt_args, check_batch_norm_backward_reduce_args,
                                 check_batch_norm_bwd_args, check_batch_norm_elemt_args, check_batch_norm_fwd_args,
                                 check_batch_norm_stats_args, check_clip_scale_args, check_lamb_args, check_lamb_norms,
                                 check_lion_args, check_norm_args, check_norm_bwd_args, check_norm_fwd_args,
                                 check_rmsprop_args, check_sgd_args, norm_stat_dtype)

__all__ = ["adam_step_", "sgd_step_", "lion_step_", "lamb_step_", "lamb_moments_", "lamb_apply_", "adagrad_step_",
           "rmsprop_step_",
           "multi_tensor_norm",
           "clip_scale_", "layer_norm", "rms_norm", "batch_norm", "instance_norm"]


def _impl(op: str, tensors: Sequence[torch.Tensor], backend: Optional[str]):
    name = _select(op, tensors[0].device.type, backend)
    if name == "triton" and torch.compiler.is_compiling() and op in _TRITON_OPS:
        return _TRITON_OPS[op]  # note [triton step ops]: traced, not a graph break
    return _backends.get(op, name)


def traced_by_compile(op: str, device_type: str, backend: Optional[str]) -> bool:
    """Whether a call of optimizer op `op` on `backend` is a dispatcher op torch.compile traces: the C++ ops, and
    the Triton launchers registered as ops (note [triton step ops] in kernels/_ops.py)."""
    name = _select(op, device_type, backend)
    return name in _COMPILED or (name == "triton" and op in _TRITON_OPS)


def _given(**kwargs: Any) -> dict[str, Any]:
    """The keywords that are not None: the optional arguments a call passes on (the precision policy's)."""
    return {k: v for k, v in kwargs.items() if v is not None}


def _step(op: str, check, tensor_lists: Sequence[Sequence[torch.Tensor]], hyper: dict[str, Sequence[float]],
          group_sizes: Optional[Sequence[int]], backend: Optional[str], **rest) -> None:
    """One call of step op `op` by the backend that serves it: its tensor lists and per-group `hyper` lists as
    lists, group_sizes defaulting to one group, `rest` (flags and the StepAux arguments) as given."""
    lists = [list(t) for t in tensor_lists]
    kwargs = {name: list(values) for name, values in hyper.items()}
    kwargs.update(group_sizes=list(group_sizes if group_sizes is not None else [len(lists[0])]), **rest)
    if not lists[0]:
        check(*lists, **kwargs)  # no tensor to dispatch on: check the lists and do nothing
        return
    _impl(op, lists[0], backend)(*lists, **kwargs)


def adam_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    max_exp_avg_sqs: Sequence[torch.Tensor],
    state_steps: Sequence[torch.Tensor],
    *,
    lr: Sequence[float],
    beta1: Sequence[float],
    beta2: Sequence[float],
    weight_decay: Sequence[float],
    eps: Sequence[float],
    l1_weight_decay: Sequence[float] = (),
    group_sizes: Optional[Sequence[int]] = None,
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    lr_tensor: Optional[torch.Tensor] = None,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
    grad_norm: Optional[torch.Tensor] = None,
    max_grad_norm: float = 0.0,
    master_params: Optional[Sequence[torch.Tensor]] = None,
    param_remainders: Optional[Sequence[torch.Tensor]] = None,
    stochastic_seed: Optional[int] = None,
    backend: Optional[str] = None,
) -> None:
    """One Adam (or AdamW, with decoupled_weight_decay) step over many tensors of one device and dtype, in place.

    Per-group hyperparameters are lists with one value per group; tensors are
    ordered by group and `group_sizes` counts them (default: one group). With
    `grad_norm` (the L2 norm of the grads as passed), grads are clipped to
    `max_grad_norm` inside the kernel, as torch.nn.utils.clip_grad_norm_ would. `l1_weight_decay` (one per
    group, or empty: none) adds l1 * sign(p) to the scaled grads, before weight_decay. The state lists may be of
    another dtype than params (float32 or bfloat16, one per call). At most one precision policy
    (csrc/include/pyoptim/precision.h): `master_params` (fp32 masters of 16-bit params: the update runs on them
    and params get them rounded to nearest), `param_remainders` (int16: bf16 param + remainder is the fp32
    master) or `stochastic_seed` (bf16 params stochastically rounded, reproducibly per seed and step).
    """
    precision = _given(master_params=master_params, param_remainders=param_remainders,
                       stochastic_seed=stochastic_seed)
    _step("adam_step_", check_adam_args, (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps),
          dict(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, l1_weight_decay=l1_weight_decay),
          group_sizes, backend, amsgrad=amsgrad, maximize=maximize, decoupled_weight_decay=decoupled_weight_decay,
          lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf, grad_norm=grad_norm,
          max_grad_norm=max_grad_norm, **precision)


def sgd_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor],
    *,
    lr: Sequence[float],
    momentum: Sequence[float],
    dampening: Sequence[float],
    weight_decay: Sequence[float],
    l1_weight_decay: Sequence[float] = (),
    group_sizes: Optional[Sequence[int]] = None,
    nesterov: bool = False,
    maximize: bool = False,
    is_first_step: bool = False,
    lr_tensor: Optional[torch.Tensor] = None,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
    grad_norm: Optional[torch.Tensor] = None,
    max_grad_norm: float = 0.0,
    master_params: Optional[Sequence[torch.Tensor]] = None,
    param_remainders: Optional[Sequence[torch.Tensor]] = None,
    stochastic_seed: Optional[int] = None,
    state_steps: Optional[Sequence[torch.Tensor]] = None,
    backend: Optional[str] = None,
) -> None:
    """One SGD step (momentum, dampening, Nesterov, weight decay) over many tensors of one device and dtype, in place.

    `momentum_buffers` is empty when no group has momentum; with
    `is_first_step` the buffers are overwritten with the grads, as torch's SGD
    starts them. The precision policy and the buffers' dtype as in adam_step_; SGD keeps no step, so
    `stochastic_seed` needs `state_steps` (float32 counters, advanced by one each step). Other arguments as in
    adam_step_.
    """
    precision = _given(master_params=master_params, param_remainders=param_remainders,
                       stochastic_seed=stochastic_seed, state_steps=state_steps)
    _step("sgd_step_", check_sgd_args, (params, grads, momentum_buffers),
          dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
               l1_weight_decay=l1_weight_decay),
          group_sizes, backend, nesterov=nesterov, maximize=maximize, is_first_step=is_first_step,
          lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf, grad_norm=grad_norm,
          max_grad_norm=max_grad_norm, **precision)


def lion_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    *,
    lr: Sequence[float],
    beta1: Sequence[float],
    beta2: Sequence[float],
    weight_decay: Sequence[float],
    l1_weight_decay: Sequence[float] = (),
    group_sizes: Optional[Sequence[int]] = None,
    maximize: bool = False,
    lr_tensor: Optional[torch.Tensor] = None,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
    grad_norm: Optional[torch.Tensor] = None,
    max_grad_norm: float = 0.0,
    master_params: Optional[Sequence[torch.Tensor]] = None,
    param_remainders: Optional[Sequence[torch.Tensor]] = None,
    stochastic_seed: Optional[int] = None,
    state_steps: Optional[Sequence[torch.Tensor]] = None,
    backend: Optional[str] = None,
) -> None:
    """One Lion step over many tensors of one device and dtype, in place (csrc/include/pyoptim/lion.h's math).

    Per-group lists, group_sizes, the StepAux arguments, l1_weight_decay, the exp_avgs' dtype and the precision
    policy as in adam_step_; Lion keeps no step, so `stochastic_seed` needs `state_steps` (float32 counters,
    advanced by one each step), as in sgd_step_.
    """
    precision = _given(master_params=master_params, param_remainders=param_remainders,
                       stochastic_seed=stochastic_seed, state_steps=state_steps)
    _step("lion_step_", check_lion_args, (params, grads, exp_avgs),
          dict(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, l1_weight_decay=l1_weight_decay),
          group_sizes, backend, maximize=maximize, lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
          grad_norm=grad_norm, max_grad_norm=max_grad_norm, **precision)


def lamb_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    state_steps: Sequence[torch.Tensor],
    *,
    lr: Sequence[float],
    beta1: Sequence[float],
    beta2: Sequence[float],
    weight_decay: Sequence[float],
    eps: Sequence[float],
    l1_weight_decay: Sequence[float] = (),
    group_sizes: Optional[Sequence[int]] = None,
    maximize: bool = False,
    lr_tensor: Optional[torch.Tensor] = None,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
    grad_norm: Optional[torch.Tensor] = None,
    max_grad_norm: float = 0.0,
    master_params: Optional[Sequence[torch.Tensor]] = None,
    param_remainders: Optional[Sequence[torch.Tensor]] = None,
    stochastic_seed: Optional[int] = None,
    backend: Optional[str] = None,
) -> None:
    """One LAMB step over many tensors of one device and dtype, in place (csrc/include/pyoptim/lamb.h's math).

    Per-group lists, group_sizes, the StepAux arguments and l1_weight_decay as in adam_step_; `grad_norm` with
    `max_grad_norm` is the global clip of the grads before the moments. The precision policy and the moments'
    dtype as in adam_step_: p is the master wherever it is read (weight decay, the trust ratio's ||p||).
    """
    _step("lamb_step_", check_lamb_args, (params, grads, exp_avgs, exp_avg_sqs, state_steps),
          dict(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, l1_weight_decay=l1_weight_decay),
          group_sizes, backend, maximize=maximize, lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
          grad_norm=grad_norm, max_grad_norm=max_grad_norm,
          **_given(master_params=master_params, param_remainders=param_remainders, stochastic_seed=stochastic_seed))


def lamb_moments_(params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, beta1, beta2, weight_decay, eps,
                  l1_weight_decay=(), group_sizes=None, maximize=False, lr_tensor=None, grad_scale=None,
                  found_inf=None, grad_norm=None, max_grad_norm=0.0, master_params=None, param_remainders=None,
                  stochastic_seed=None, backend=None) -> torch.Tensor:
    """LAMB's first pass (steps, m and v moved), returning float64 [2, n]: each tensor's ||p||^2 and ||u||^2.

    With lamb_apply_ over the same arguments and these norms, lamb_step_ (note [LAMB's two passes] in
    pyoptim/optim/lamb.py): a caller may reduce the norms in between, as DTensor shards need. The masters or
    remainders of a precision policy are read here (p's fp32 value), written by lamb_apply_.
    """
    lists = [list(t) for t in (params, grads, exp_avgs, exp_avg_sqs, state_steps)]
    kwargs = dict(lr=list(lr), beta1=list(beta1), beta2=list(beta2), weight_decay=list(weight_decay), eps=list(eps),
                  l1_weight_decay=list(l1_weight_decay),
                  group_sizes=list(group_sizes if group_sizes is not None else [len(lists[0])]), maximize=maximize,
                  lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf, grad_norm=grad_norm,
                  max_grad_norm=max_grad_norm,
                  **_given(master_params=master_params, param_remainders=param_remainders,
                           stochastic_seed=stochastic_seed))
    if not lists[0]:
        check_lamb_args(*lists, **kwargs, op="lamb_moments_")
        return torch.zeros(2, 0, dtype=torch.float64)
    return _impl("lamb_moments_", lists[0], backend)(*lists, **kwargs)


def lamb_apply_(params, grads, exp_avgs, exp_avg_sqs, state_steps, norms, *, lr, beta1, beta2, weight_decay, eps,
                l1_weight_decay=(), group_sizes=None, maximize=False, lr_tensor=None, grad_scale=None,
                found_inf=None, grad_norm=None, max_grad_norm=0.0, master_params=None, param_remainders=None,
                stochastic_seed=None, backend=None) -> None:
    """LAMB's second pass: p moved by -lr * r * u, r the trust ratio of the given [2, n] norms (lamb_moments_'s),
    written through the precision policy (masters, remainders or stochastic rounding, as in lamb_step_)."""
    lists = [list(t) for t in (params, grads, exp_avgs, exp_avg_sqs, state_steps)]
    kwargs = dict(lr=list(lr), beta1=list(beta1), beta2=list(beta2), weight_decay=list(weight_decay), eps=list(eps),
                  l1_weight_decay=list(l1_weight_decay),
                  group_sizes=list(group_sizes if group_sizes is not None else [len(lists[0])]), maximize=maximize,
                  lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf, grad_norm=grad_norm,
                  max_grad_norm=max_grad_norm,
                  **_given(master_params=master_params, param_remainders=param_remainders,
                           stochastic_seed=stochastic_seed))
    if not lists[0]:
        check_lamb_args(*lists, **kwargs, op="lamb_apply_")
        return
    _impl("lamb_apply_", lists[0], backend)(*lists, norms, **kwargs)


def adagrad_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    state_sums: Sequence[torch.Tensor],
    state_steps: Sequence[torch.Tensor],
    *,
    lr: Sequence[float],
    lr_decay: Sequence[float],
    weight_decay: Sequence[float],
    eps: Sequence[float],
    l1_weight_decay: Sequence[float] = (),
    group_sizes: Optional[Sequence[int]] = None,
    maximize: bool = False,
    lr_tensor: Optional[torch.Tensor] = None,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
    grad_norm: Optional[torch.Tensor] = None,
    max_grad_norm: float = 0.0,
    master_params: Optional[Sequence[torch.Tensor]] = None,
    param_remainders: Optional[Sequence[torch.Tensor]] = None,
    stochastic_seed: Optional[int] = None,
    backend: Optional[str] = None,
) -> None:
    """One Adagrad step over many tensors of one device and dtype, in place (csrc/include/pyoptim/adagrad.h's math).

    Per-group lists, group_sizes, the StepAux arguments, l1_weight_decay, the state_sums' dtype and the precision
    policy as in adam_step_ (stochastic rounding hashes the advanced state_steps).
    """
    precision = _given(master_params=master_params, param_remainders=param_remainders,
                       stochastic_seed=stochastic_seed)
    _step("adagrad_step_", check_adagrad_args, (params, grads, state_sums, state_steps),
          dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps, l1_weight_decay=l1_weight_decay),
          group_sizes, backend, maximize=maximize, lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
          grad_norm=grad_norm, max_grad_norm=max_grad_norm, **precision)


def rmsprop_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    square_avgs: Sequence[torch.Tensor],
    grad_avgs: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor],
    state_steps: Sequence[torch.Tensor],
    *,
    lr: Sequence[float],
    alpha: Sequence[float],
    eps: Sequence[float],
    weight_decay: Sequence[float],
    momentum: Sequence[float],
    l1_weight_decay: Sequence[float] = (),
    group_sizes: Optional[Sequence[int]] = None,
    centered: bool = False,
    maximize: bool = False,
    lr_tensor: Optional[torch.Tensor] = None,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
    grad_norm: Optional[torch.Tensor] = None,
    max_grad_norm: float = 0.0,
    master_params: Optional[Sequence[torch.Tensor]] = None,
    param_remainders: Optional[Sequence[torch.Tensor]] = None,
    stochastic_seed: Optional[int] = None,
    backend: Optional[str] = None,
) -> None:
    """One RMSprop step over many tensors of one device and dtype, in place (csrc/include/pyoptim/rmsprop.h's math).

    `grad_avgs` is read only when `centered`; `momentum_buffers` is empty when no group has momentum. Per-group
    lists, group_sizes, the StepAux arguments, l1_weight_decay, the state's dtype (one for square_avgs, grad_avgs
    and momentum_buffers) and the precision policy as in adam_step_ (stochastic rounding hashes the advanced
    state_steps).
    """
    precision = _given(master_params=master_params, param_remainders=param_remainders,
                       stochastic_seed=stochastic_seed)
    _step("rmsprop_step_", check_rmsprop_args,
          (params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps),
          dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
               l1_weight_decay=l1_weight_decay),
          group_sizes, backend, centered=centered, maximize=maximize, lr_tensor=lr_tensor, grad_scale=grad_scale,
          found_inf=found_inf, grad_norm=grad_norm, max_grad_norm=max_grad_norm, **precision)


def multi_tensor_norm(tensors: Sequence[torch.Tensor], norm_type: float = 2.0, *,
                      backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The p-norm of many tensors of one device and dtype, as (total, per-tensor norms), in float32, in one pass."""
    tensors = list(tensors)
    if not tensors:
        check_norm_args(tensors, float(norm_type))  # no tensor to dispatch on: check and return zeros
        return torch.zeros(()), torch.zeros(0)
    return _impl("multi_tensor_norm", tensors, backend)(tensors, float(norm_type))


def clip_scale_(tensors: Sequence[torch.Tensor], total_norm: torch.Tensor, max_norm: float, *,
                backend: Optional[str] = None) -> None:
    """Scale every tensor in place by min(1, max_norm / (total_norm + 1e-6)), reading total_norm on its device."""
    tensors = list(tensors)
    if not tensors:
        return
    _impl("clip_scale_", tensors, backend)(tensors, total_norm, float(max_norm))


if _backends.EXTENSION_LOADED:
    # Fake (meta) kernels: the in-place ops only check; the norm allocates.

    @torch.library.register_fake("pyoptim::adam_step_")
    def _adam_step_fake(*args, **kwargs):
        check_adam_args(*args, **kwargs)

    @torch.library.register_fake("pyoptim::sgd_step_")
    def _sgd_step_fake(*args, **kwargs):
        check_sgd_args(*args, **kwargs)

    @torch.library.register_fake("pyoptim::lion_step_")
    def _lion_step_fake(*args, **kwargs):
        check_lion_args(*args, **kwargs)

    @torch.library.register_fake("pyoptim::lamb_step_")
    def _lamb_step_fake(*args, **kwargs):
        check_lamb_args(*args, **kwargs)

    @torch.library.register_fake("pyoptim::lamb_moments_")
    def _lamb_moments_fake(*args, **kwargs):
        check_lamb_args(*args, **kwargs, op="lamb_moments_")
        return args[0][0].new_empty((2, len(args[0])), dtype=torch.float64)

    @torch.library.register_fake("pyoptim::lamb_apply_")
    def _lamb_apply_fake(params, grads, exp_avgs, exp_avg_sqs, state_steps, norms, **kwargs):
        check_lamb_args(params, grads, exp_avgs, exp_avg_sqs, state_steps, **kwargs, op="lamb_apply_")
        check_lamb_norms("lamb_apply_", norms, params)

    @torch.library.register_fake("pyoptim::adagrad_step_")
    def _adagrad_step_fake(*args, **kwargs):
        check_adagrad_args(*args, **kwargs)

    @torch.library.register_fake("pyoptim::rmsprop_step_")
    def _rmsprop_step_fake(*args, **kwargs):
        check_rmsprop_args(*args, **kwargs)

    @torch.library.register_fake("pyoptim::multi_tensor_norm")
    def _multi_tensor_norm_fake(tensors, norm_type):
        check_norm_args(tensors, norm_type)
        t0 = tensors[0]
        return t0.new_empty((), dtype=torch.float32), t0.new_empty((len(tensors),), dtype=torch.float32)

    @torch.library.register_fake("pyoptim::clip_scale_")
    def _clip_scale_fake(tensors, total_norm, max_norm):
        check_clip_scale_args(tensors, total_norm, max_norm)


# -- LayerNorm / RMSNorm ---------------------------------------------------------
#
# The C++ backends (cpu, cuda) are dispatcher ops with fake kernels registered
# below and their autograd in C++ (note [C++ autograd] in
# csrc/norm_dispatch.cpp), so torch.compile traces them whole. The Python
# backends (triton, reference), and every backend inside torch.func transforms
# (note [torch.func]), run under _NormFunction, through _norm_fwd/_norm_bwd,
# which give the two ops of each norm one calling convention: LayerNorm's.

_ShapeLike = Union[int, Sequence[int], torch.Size]
_COMPILED = ("cpu", "cuda")


def _norm_fwd(rms: bool, impl, input, normalized_shape, weight, bias, eps):
    """(out, mean or None, rstd) from a forward implementation of either norm."""
    if rms:
        out, rstd = impl(input, normalized_shape, weight, eps)
        return out, None, rstd
    return impl(input, normalized_shape, weight, bias, eps)


def _norm_bwd(rms: bool, impl, grad_out, input, normalized_shape, mean, rstd, weight, bias, output_mask):
    """(grad_input, grad_weight, grad_bias) from a backward implementation of either norm."""
    if rms:
        dx, dw = impl(grad_out, input, normalized_shape, rstd, weight, list(output_mask[:2]))
        return dx, dw, None
    return impl(grad_out, input, normalized_shape, mean, rstd, weight, bias, list(output_mask))


class _NormFunction(torch.autograd.Function):
    """Autograd of either norm for the Python backends (triton, reference), and for every backend inside
    torch.func transforms (note [torch.func]); forward returns (out, mean or None, rstd)."""

    generate_vmap_rule = True  # under vmap, the forward's ops are vmapped (pyoptim's by the batched fallback)

    @staticmethod
    def forward(rms, backend, input, normalized_shape, weight, bias, eps):
        fwd = _backends.get("rms_norm_fwd" if rms else "layer_norm_fwd", backend)
        return _norm_fwd(rms, fwd, input, normalized_shape, weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        rms, backend, input, normalized_shape, weight, bias, _ = inputs
        _, mean, rstd = output
        ctx.save_for_backward(input, weight, bias, mean, rstd)
        ctx.rms, ctx.backend, ctx.normalized_shape = rms, backend, normalized_shape
        ctx.mark_non_differentiable(*(t for t in (mean, rstd) if t is not None))

    @staticmethod
    @torch.autograd.function.once_differentiable  # as the C++ backends: no second derivative
    def backward(ctx, grad_out, _grad_mean, _grad_rstd):
        bwd = _backends.get("rms_norm_bwd" if ctx.rms else "layer_norm_bwd", ctx.backend)
        input, weight, bias, mean, rstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[2], weight is not None and need[4], bias is not None and need[5]]
        dx, dw, db = _norm_bwd(ctx.rms, bwd, grad_out, input, ctx.normalized_shape, mean, rstd, weight, bias, mask)
        return None, None, dx if mask[0] else None, None, dw if mask[1] else None, db if mask[2] else None, None


def _dispatched(name: str) -> bool:
    """Whether backend `name` runs as a dispatcher op with its C++ autograd (note [C++ autograd]).

    note [torch.func]: torch.func transforms (grad, vmap, jacrev, ...) refuse
    C++ autograd Functions, so inside them every backend runs under the
    Python autograd.Function (_NormFunction, _BatchNormFunction), whose
    forward calls the ops with grad off (csrc/norm_dispatch.cpp, note [no
    graph, no Function]). Under torch.compile the dispatcher op is traced.
    The Triton launchers take raw pointers, which the wrapped tensors of a
    transform do not have: there that backend refuses with a clear error.
    """
    in_transform = not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()
    if in_transform and name == "triton":
        raise RuntimeError("pyoptim: the triton backend cannot run inside torch.func transforms (grad, vmap, ...); "
                           "use backend='cuda' (the default on GPUs) or 'reference'")
    return name in _COMPILED and not in_transform


@torch.compiler.assume_constant_result
def _select(op: str, device_type: str, backend: Optional[str]) -> str:
    # Under torch.compile the choice is made once, at trace time: dynamo does
    # not trace into _backends (its caches, build queries and imports). The
    # choice's implementations are resolved here too, so that what the trace
    # then calls (_NormFunction's lookups, the Triton ops) is there to read.
    name = _backends.select(op, device_type, backend)
    _prepare(op, name)
    return name


# The forward ops whose backward op _prepare resolves with them.
_BACKWARD_OF = {"layer_norm_fwd": "layer_norm_bwd", "rms_norm_fwd": "rms_norm_bwd", "batch_norm_fwd": "batch_norm_bwd"}


@functools.cache
def _prepare(op: str, backend: str) -> None:
    """Resolve `op` and its backward by `backend` (importing a Triton kernel module registers its ops: note
    [triton ops] in kernels/_ops.py) and give the Triton forward op its autograd formula, once."""
    for name in (op, _BACKWARD_OF.get(op)):
        if name is not None:
            _backends.get(name, backend)
    if backend == "triton" and op in _BACKWARD_OF:
        _register_triton_autograd(op)
    if backend == "triton" and op in _backends.LIST_OPS:
        from pyoptim.kernels._ops import register_dispatched_op

        registered = register_dispatched_op(op, _backends.get(op, backend), _backends.get(op, "reference"))
        if registered is not None:
            _TRITON_OPS[op] = registered


# The list ops (_backends.LIST_OPS) whose Triton launchers _prepare has registered as dispatcher ops (note
# [triton step ops]).
_TRITON_OPS: dict[str, Any] = {}


def _as_shape(normalized_shape: _ShapeLike) -> list[int]:
    return [int(normalized_shape)] if isinstance(normalized_shape, int) else [int(s) for s in normalized_shape]


@functools.cache
def _torch_autocasts(aten_op: str) -> bool:
    """Whether this torch runs aten_op in float32 under CUDA autocast (it lists no other policy for a norm)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(aten_op, "AutocastCUDA")


def _python_norm(rms: bool, name: str, input, shape, weight, bias, eps):
    """The Python backends' norm under torch's CUDA autocast policy (note [autocast] in csrc/norm_dispatch.cpp:
    the C++ backends get it from the dispatcher)."""
    if (input.device.type == "cuda" and torch.is_autocast_enabled("cuda")
            and _torch_autocasts("aten::rms_norm" if rms else "aten::layer_norm")):
        input, weight, bias = (t.float() if t is not None and t.dtype in (torch.float16, torch.bfloat16) else t
                               for t in (input, weight, bias))
        with torch.autocast("cuda", enabled=False):
            return _python_norm_call(rms, name, input, shape, weight, bias, eps)
    return _python_norm_call(rms, name, input, shape, weight, bias, eps)


def _python_norm_call(rms: bool, name: str, input, shape, weight, bias, eps):
    if name == "triton":  # its ops, with their autograd (note [triton ops]); _dispatched refused transforms
        if rms:
            return torch.ops.pyoptim.rms_norm_fwd_triton(input, shape, weight, eps)[0]
        return torch.ops.pyoptim.layer_norm_fwd_triton(input, shape, weight, bias, eps)[0]
    return _NormFunction.apply(rms, name, input, shape, weight, bias, eps)[0]


def layer_norm(input: torch.Tensor, normalized_shape: _ShapeLike, weight: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, eps: float = 1e-5, *,
               backend: Optional[str] = None) -> torch.Tensor:
    """F.layer_norm: (x - mean) / sqrt(var + eps) * weight + bias over the trailing dims `normalized_shape`."""
    shape = _as_shape(normalized_shape)
    name = _select("layer_norm_fwd", input.device.type, backend)
    if _dispatched(name):
        return torch.ops.pyoptim.layer_norm_fwd(input, shape, weight, bias, eps)[0]
    return _python_norm(False, name, input, shape, weight, bias, eps)


def rms_norm(input: torch.Tensor, normalized_shape: _ShapeLike, weight: Optional[torch.Tensor] = None,
             eps: Optional[float] = None, *, backend: Optional[str] = None) -> torch.Tensor:
    """F.rms_norm: x / sqrt(mean(x^2) + eps) * weight over the trailing dims `normalized_shape`."""
    shape = _as_shape(normalized_shape)
    if (weight is not None and weight.dtype != input.dtype and weight.is_floating_point()
            and input.is_floating_point() and input.dtype in FLOAT_DTYPES and weight.dtype in FLOAT_DTYPES):
        # torch's rms_norm takes a weight of any floating dtype (its composite
        # path promotes, and returns the input's dtype); the kernels take the
        # input's dtype, or float32 below it. The cast is differentiable: the
        # weight's grad comes back in its own dtype.
        math = torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype
        if weight.dtype != math:
            weight = weight.to(math)
    name = _select("rms_norm_fwd", input.device.type, backend)
    if _dispatched(name):
        return torch.ops.pyoptim.rms_norm_fwd(input, shape, weight, eps)[0]
    return _python_norm(True, name, input, shape, weight, None, eps)


if _backends.EXTENSION_LOADED:

    @torch.library.register_fake("pyoptim::layer_norm_fwd")
    def _layer_norm_fwd_fake(input, normalized_shape, weight, bias, eps):
        _, _, stat_shape = check_norm_fwd_args("layer_norm_fwd", False, input, normalized_shape, weight, bias)
        sd = norm_stat_dtype(input.dtype)
        return (input.new_empty(input.shape), input.new_empty(stat_shape, dtype=sd),
                input.new_empty(stat_shape, dtype=sd))

    @torch.library.register_fake("pyoptim::rms_norm_fwd")
    def _rms_norm_fwd_fake(input, normalized_shape, weight, eps):
        _, _, stat_shape = check_norm_fwd_args("rms_norm_fwd", True, input, normalized_shape, weight, None)
        return input.new_empty(input.shape), input.new_empty(stat_shape, dtype=norm_stat_dtype(input.dtype))

    def _norm_bwd_fake(op, rms, grad_out, input, normalized_shape, mean, rstd, weight, bias, output_mask):
        check_norm_bwd_args(op, rms, grad_out, input, normalized_shape, mean, rstd, weight, bias)
        wdtype = weight.dtype if weight is not None else (bias.dtype if bias is not None else input.dtype)
        empty = input.new_empty(0)
        dx = input.new_empty(input.shape) if output_mask[0] else empty
        dw = input.new_empty(list(normalized_shape), dtype=wdtype) if output_mask[1] and weight is not None else empty
        db = (input.new_empty(list(normalized_shape), dtype=wdtype)
              if len(output_mask) > 2 and output_mask[2] and bias is not None else input.new_empty(0))
        return dx, dw, db

    @torch.library.register_fake("pyoptim::layer_norm_bwd")
    def _layer_norm_bwd_fake(grad_out, input, normalized_shape, mean, rstd, weight, bias, output_mask):
        return _norm_bwd_fake("layer_norm_bwd", False, grad_out, input, normalized_shape, mean, rstd, weight,
                              bias, output_mask)

    @torch.library.register_fake("pyoptim::rms_norm_bwd")
    def _rms_norm_bwd_fake(grad_out, input, normalized_shape, rstd, weight, output_mask):
        return _norm_bwd_fake("rms_norm_bwd", True, grad_out, input, normalized_shape, None, rstd, weight, None,
                              output_mask)[:2]


# -- BatchNorm / InstanceNorm ------------------------------------------------------
#
# As the norms above: the C++ backends (cpu, cuda) run pyoptim::batch_norm_fwd,
# whose autograd (in C++, note [C++ autograd]) calls pyoptim::batch_norm_bwd, so
# torch.compile traces them whole; the Python backends (triton, reference)
# run under _BatchNormFunction. batch_norm_fwd is functional (note [functional
# batch norm] in csrc/ops.cpp): it returns the moved running statistics and
# batch_norm copies them into the caller's buffers, as F.batch_norm updates
# them in place.


class _BatchNormFunction(torch.autograd.Function):
    """Autograd of batch_norm_fwd for the Python backends (triton, reference), and for every backend inside
    torch.func transforms (note [torch.func]); forward returns (out, new running mean, new running var)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(backend, input, weight, bias, running_mean, running_var, training, momentum, eps):
        fwd = _backends.get("batch_norm_fwd", backend)
        out, save_mean, save_invstd, new_mean, new_var = fwd(input, weight, bias, running_mean, running_var, training,
                                                             momentum, eps)
        return out, new_mean, new_var, save_mean, save_invstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        backend, input, weight, _, _, _, training, _, _ = inputs
        _, new_mean, new_var, save_mean, save_invstd = output
        ctx.save_for_backward(input, weight, save_mean, save_invstd)
        ctx.backend, ctx.training = backend, training
        ctx.mark_non_differentiable(new_mean, new_var, save_mean, save_invstd)

    @staticmethod
    @torch.autograd.function.once_differentiable  # as the C++ backends: no second derivative
    def backward(ctx, grad_out, _grad_new_mean, _grad_new_var, _grad_mean, _grad_invstd):
        input, weight, save_mean, save_invstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[1], weight is not None and need[2], need[3]]
        dx, dw, db = _backends.get("batch_norm_bwd", ctx.backend)(grad_out, input, weight, save_mean, save_invstd,
                                                                  ctx.training, mask)
        grads = (dx if mask[0] else None, dw if mask[1] else None, db if mask[2] else None)
        return (None, *grads, None, None, None, None, None)


def _batch_norm(input: torch.Tensor, running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], training: bool, momentum: float,
                eps: float, backend: Optional[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, new_running_mean, new_running_var) of batch_norm_fwd, differentiable in input, weight and bias."""
    name = _select("batch_norm_fwd", input.device.type, backend)
    if _dispatched(name) or name == "triton":  # the triton op has its autograd (note [triton ops])
        op = torch.ops.pyoptim.batch_norm_fwd if name != "triton" else torch.ops.pyoptim.batch_norm_fwd_triton
        out, _, _, new_mean, new_var = op(input, weight, bias, running_mean, running_var, training, momentum, eps)
        return out, new_mean, new_var
    return _BatchNormFunction.apply(name, input, weight, bias, running_mean, running_var, training, momentum,
                                    eps)[:3]


def _verify_batch_size(size: Sequence[int]) -> None:
    # F.batch_norm's own check (torch.nn.functional._verify_batch_size).
    size_prods = size[0]
    for s in size[2:]:
        size_prods *= s
    if size_prods == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


def batch_norm(input: torch.Tensor, running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
               weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5, *, backend: Optional[str] = None) -> torch.Tensor:
    """F.batch_norm: (x - mean) / sqrt(var + eps) * weight + bias per channel (dim 1); training moves running stats."""
    if training:
        _verify_batch_size(input.size())
    # F.batch_norm's own checks and messages.
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    elif eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    out, new_mean, new_var = _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                         backend)
    if training and running_mean is not None:
        with torch.no_grad():
            torch._foreach_copy_([running_mean, running_var], [new_mean, new_var])  # one dispatch for both
    return out


def _verify_spatial_size(size: Sequence[int]) -> None:
    # F.instance_norm's own check (torch.nn.functional._verify_spatial_size).
    size_prods = 1
    for s in size[2:]:
        size_prods *= s
    if size_prods == 1:
        raise ValueError(f"Expected more than 1 spatial element when training, got input size {size}")


def instance_norm(input: torch.Tensor, running_mean: Optional[torch.Tensor] = None,
                  running_var: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None,
                  bias: Optional[torch.Tensor] = None, use_input_stats: bool = True, momentum: float = 0.1,
                  eps: float = 1e-5, *, backend: Optional[str] = None) -> torch.Tensor:
    """F.instance_norm: batch_norm of every (sample, channel) pair on its own; running stats averaged over samples."""
    if use_input_stats:
        _verify_spatial_size(input.size())
    if not use_input_stats and (running_mean is None or running_var is None):
        # torch's own message (aten's instance_norm).
        raise RuntimeError("Expected running_mean and running_var to be defined when use_input_stats is false")
    # As aten's instance_norm: the (N, C, *) input seen as one sample of N * C
    # channels, with weight, bias and running statistics repeated N times; the
    # running statistics come back as their mean over the N copies. The view
    # needs a contiguous input, so a channels_last one is copied here, as torch
    # copies it (the output is contiguous, as torch's).
    b, c = input.shape[0], input.shape[1]
    shape = [1, b * c] + list(input.shape[2:])
    weight_, bias_, mean_, var_ = (t.repeat(b) if t is not None else None
                                   for t in (weight, bias, running_mean, running_var))
    out, new_mean, new_var = _batch_norm(input.contiguous().view(shape), mean_, var_, weight_, bias_,
                                         use_input_stats, momentum, eps, backend)
    if running_mean is not None:
        if use_input_stats:
            mean_, var_ = new_mean, new_var
        with torch.no_grad():
            running_mean.copy_(mean_.view(b, c).mean(0))
            running_var.copy_(var_.view(b, c).mean(0))
    return out.view(input.shape)


if _backends.EXTENSION_LOADED:

    def _bn_empty(input):
        return input.new_empty(0)

    @torch.library.register_fake("pyoptim::batch_norm_fwd")
    def _batch_norm_fwd_fake(input, weight, bias, running_mean, running_var, training, momentum, eps):
        _, c, _ = check_batch_norm_fwd_args("batch_norm_fwd", input, weight, bias, running_mean, running_var,
                                            training, True)
        sd = norm_stat_dtype(input.dtype)
        out = torch.empty_like(batch_norm_layout(input))
        if training and running_mean is not None:
            new_mean = running_mean.new_empty(running_mean.shape)
            new_var = running_var.new_empty(running_var.shape)
        else:
            new_mean, new_var = _bn_empty(input), _bn_empty(input)
        return out, input.new_empty(c, dtype=sd), input.new_empty(c, dtype=sd), new_mean, new_var

    @torch.library.register_fake("pyoptim::batch_norm_bwd")
    def _batch_norm_bwd_fake(grad_out, input, weight, save_mean, save_invstd, training, output_mask):
        _, c, _ = check_batch_norm_bwd_args(grad_out, input, weight, save_mean, save_invstd, training)
        wdtype = weight.dtype if weight is not None else input.dtype
        dx = torch.empty_like(batch_norm_layout(input)) if output_mask[0] else _bn_empty(input)
        dw = input.new_empty(c, dtype=wdtype) if output_mask[1] and weight is not None else _bn_empty(input)
        db = input.new_empty(c, dtype=wdtype) if output_mask[2] else _bn_empty(input)
        return dx, dw, db

    @torch.library.register_fake("pyoptim::batch_norm_stats")
    def _batch_norm_stats_fake(input):
        _, c, _ = check_batch_norm_stats_args(input)
        sd = norm_stat_dtype(input.dtype)
        return input.new_empty(c, dtype=sd), input.new_empty(c, dtype=sd)

    @torch.library.register_fake("pyoptim::batch_norm_elemt")
    def _batch_norm_elemt_fake(input, weight, bias, mean, invstd):
        check_batch_norm_elemt_args(input, weight, bias, mean, invstd)
        return torch.empty_like(batch_norm_layout(input))

    @torch.library.register_fake("pyoptim::batch_norm_backward_reduce")
    def _batch_norm_backward_reduce_fake(grad_out, input, mean):
        _, c, _ = check_batch_norm_backward_reduce_args(grad_out, input, mean)
        sd = norm_stat_dtype(input.dtype)
        return input.new_empty(c, dtype=sd), input.new_empty(c, dtype=sd)

    @torch.library.register_fake("pyoptim::batch_norm_backward_elemt")
    def _batch_norm_backward_elemt_fake(grad_out, input, mean, invstd, weight, mean_dy, mean_dy_xmu):
        check_batch_norm_backward_elemt_args(grad_out, input, mean, invstd, weight, mean_dy, mean_dy_xmu)
        return torch.empty_like(batch_norm_layout(input))


# -- the Triton ops' autograd (note [triton ops] in kernels/_ops.py) --------------------
#
# The formulas of _NormFunction and _BatchNormFunction, registered on the
# Triton backend's forward ops when _prepare first resolves them.


def _norm_triton_setup_context(ctx, inputs, output) -> None:
    rms = len(inputs) == 4  # rms_norm_fwd_triton(input, normalized_shape, weight, eps)
    input, normalized_shape, weight = inputs[:3]
    bias = None if rms else inputs[3]
    mean, rstd = (None, output[1]) if rms else output[1:]
    ctx.save_for_backward(input, weight, bias, mean, rstd)
    ctx.rms, ctx.normalized_shape = rms, normalized_shape
    ctx.mark_non_differentiable(*(t for t in (mean, rstd) if t is not None))


def _norm_triton_backward(ctx, grad_out, *_grad_stats):
    input, weight, bias, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0], weight is not None and need[2], bias is not None and not ctx.rms and need[3]]
    bwd = torch.ops.pyoptim.rms_norm_bwd_triton if ctx.rms else torch.ops.pyoptim.layer_norm_bwd_triton
    dx, dw, db = _norm_bwd(ctx.rms, bwd, grad_out, input, ctx.normalized_shape, mean, rstd, weight, bias, mask)
    grads = (dx if mask[0] else None, None, dw if mask[1] else None)
    return grads + ((None,) if ctx.rms else (db if mask[2] else None, None))


def _batch_norm_triton_setup_context(ctx, inputs, output) -> None:
    input, weight, _, _, _, training, _, _ = inputs
    _, save_mean, save_invstd, new_mean, new_var = output
    ctx.save_for_backward(input, weight, save_mean, save_invstd)
    ctx.training = training
    ctx.mark_non_differentiable(save_mean, save_invstd, new_mean, new_var)


def _batch_norm_triton_backward(ctx, grad_out, *_grad_stats):
    input, weight, save_mean, save_invstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0], weight is not None and need[1], need[2]]
    dx, dw, db = torch.ops.pyoptim.batch_norm_bwd_triton(grad_out, input, weight, save_mean, save_invstd,
                                                         ctx.training, mask)
    return (dx if mask[0] else None, dw if mask[1] else None, db if mask[2] else None, None, None, None, None, None)


def _register_triton_autograd(op: str) -> None:
    """Give torch.ops.pyoptim.<op>_triton (a forward norm op) its autograd formula."""
    setup, backward = ((_batch_norm_triton_setup_context, _batch_norm_triton_backward) if op == "batch_norm_fwd"
                       else (_norm_triton_setup_context, _norm_triton_backward))
    torch.library.register_autograd(f"pyoptim::{op}_triton", backward, setup_context=setup)
