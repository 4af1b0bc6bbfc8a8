"""Argument checks of the ops, for the backends written in Python.

The C++ backends run the same checks in csrc/adam_host.cpp, with the same
messages; the fake (meta) kernels and the triton and reference backends run
these. Every check runs before anything is written.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

_ADAM_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check(cond: bool, *msg: object) -> None:
    if not cond:
        raise RuntimeError("adam_step_: " + "".join(str(m) for m in msg))


def _check_like_param(name: str, i: int, t: torch.Tensor, p: torch.Tensor) -> None:
    _check(t is not None, name, "[", i, "] is undefined")
    _check(t.layout == torch.strided, name, "[", i, "] is sparse (layout ", t.layout,
           "); Adam does not support sparse gradients, please consider SparseAdam instead")
    _check(t.device == p.device, name, "[", i, "] is on ", t.device, " but params[", i, "] is on ", p.device)
    _check(t.dtype == p.dtype, name, "[", i, "] has dtype ", t.dtype, " but params[", i, "] has dtype ", p.dtype)
    _check(t.shape == p.shape, name, "[", i, "] has shape ", list(t.shape), " but params[", i, "] has shape ",
           list(p.shape))


def _check_scalar_tensor(name: str, t: Optional[torch.Tensor], device: torch.device, numel: int,
                         dtype: torch.dtype = torch.float32) -> None:
    if t is None:
        return
    _check(t.device == device, name, " is on ", t.device, " but params are on ", device)
    _check(t.dtype == dtype, name, " must be ", str(dtype).replace("torch.", ""), ", got ", t.dtype)
    _check(t.numel() == numel, name, " must have ", numel, " element(s), got ", t.numel())


def check_adam_args(
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
    group_sizes: Sequence[int],
    amsgrad: bool,
    lr_tensor: Optional[torch.Tensor] = None,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
    grad_norm: Optional[torch.Tensor] = None,
    max_grad_norm: float = 0.0,
    device_type: Optional[str] = None,
) -> None:
    """Raise RuntimeError, as the C++ backends do, on any bad argument of adam_step_."""
    n = len(params)
    _check(len(grads) == n and len(exp_avgs) == n and len(exp_avg_sqs) == n and len(state_steps) == n,
           "params, grads, exp_avgs, exp_avg_sqs and state_steps must have the same length, got ", n, ", ",
           len(grads), ", ", len(exp_avgs), ", ", len(exp_avg_sqs), ", ", len(state_steps))
    _check(not amsgrad or len(max_exp_avg_sqs) == n, "amsgrad needs one max_exp_avg_sqs entry per param, got ",
           len(max_exp_avg_sqs), " for ", n, " params")
    groups = len(group_sizes)
    _check(all(len(x) == groups for x in (lr, beta1, beta2, weight_decay, eps)),
           "lr, beta1, beta2, weight_decay and eps need one value per group (", groups, " groups)")
    for k in range(groups):
        _check(group_sizes[k] >= 0, "group_sizes[", k, "] is negative")
        _check(lr[k] >= 0.0, "Invalid learning rate: ", lr[k], " (group ", k, ")")
        _check(eps[k] >= 0.0, "Invalid epsilon value: ", eps[k], " (group ", k, ")")
        _check(0.0 <= beta1[k] < 1.0, "Invalid beta parameter at index 0: ", beta1[k], " (group ", k, ")")
        _check(0.0 <= beta2[k] < 1.0, "Invalid beta parameter at index 1: ", beta2[k], " (group ", k, ")")
        _check(weight_decay[k] >= 0.0, "Invalid weight_decay value: ", weight_decay[k], " (group ", k, ")")
    _check(sum(group_sizes) == n, "group_sizes add up to ", sum(group_sizes), " but there are ", n, " params")
    if n == 0:
        return
    p0 = params[0]
    for i, p in enumerate(params):
        _check(p is not None, "params[", i, "] is undefined")
        if device_type is not None:
            _check(p.device.type == device_type, "params[", i, "] is on ", p.device, ", expected a ", device_type,
                   " tensor")
        _check(p.layout == torch.strided, "params[", i, "] is not a strided tensor")
        _check(p.device == p0.device, "params[", i, "] is on ", p.device, " but params[0] is on ", p0.device,
               "; one call takes one device")
        _check(p.dtype in _ADAM_DTYPES, "params[", i, "] has dtype ", p.dtype,
               "; supported are float32, float64, float16 and bfloat16")
        _check(p.dtype == p0.dtype, "params[", i, "] has dtype ", p.dtype, " but params[0] has ", p0.dtype,
               "; one call takes one dtype")
        _check_like_param("grads", i, grads[i], p)
        _check_like_param("exp_avgs", i, exp_avgs[i], p)
        _check_like_param("exp_avg_sqs", i, exp_avg_sqs[i], p)
        if amsgrad:
            _check_like_param("max_exp_avg_sqs", i, max_exp_avg_sqs[i], p)
        s = state_steps[i]
        _check(s is not None and s.numel() == 1 and s.dtype == torch.float32,
               "state_steps[", i, "] must be a float32 tensor of one element")
        _check(s.device == p.device, "state_steps[", i, "] is on ", s.device, " but params[", i, "] is on ", p.device)
    _check_scalar_tensor("lr_tensor", lr_tensor, p0.device, groups, torch.float64)
    _check_scalar_tensor("grad_scale", grad_scale, p0.device, 1)
    _check_scalar_tensor("found_inf", found_inf, p0.device, 1)
    _check_scalar_tensor("grad_norm", grad_norm, p0.device, 1)
    _check(grad_norm is None or max_grad_norm > 0, "max_grad_norm must be positive, got ", max_grad_norm)
