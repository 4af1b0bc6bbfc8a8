"""Argument checks of the ops, for the backends written in Python.

The C++ backends run the same checks in csrc/adam_host.cpp, with the same
messages; the fake (meta) kernels and the triton and reference backends run
these. Every check runs before anything is written.
"""

from __future__ import annotations

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


# -- the norm ops (csrc/norm_host.cpp) -----------------------------------------

_NORM_DTYPES = _ADAM_DTYPES


def _norm_check(cond: bool, op: str, *msg: object) -> None:
    if not cond:
        raise RuntimeError(op + ": " + "".join(str(m) for m in msg))


def _torch_check(cond: bool, *msg: object) -> None:
    # torch's own messages carry no op prefix.
    if not cond:
        raise RuntimeError("".join(str(m) for m in msg))


def _dtype_name(dtype: torch.dtype) -> str:
    # c10's names, as the C++ checks print them.
    return {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
            torch.bfloat16: "BFloat16"}.get(dtype, str(dtype).replace("torch.", ""))


def norm_stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The saved statistics' dtype: float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rms_norm_eps(eps: Optional[float], dtype: torch.dtype) -> float:
    """RMSNorm's eps: as given, else torch.finfo(dtype).eps (F.rms_norm's default)."""
    return float(torch.finfo(dtype).eps) if eps is None else float(eps)


def _check_norm_param(op: str, name: str, t: Optional[torch.Tensor], input: torch.Tensor,
                      normalized_shape: list[int]) -> None:
    if t is None:
        return
    _torch_check(list(t.shape) == normalized_shape, "Expected ", name,
                 " to be of same shape as normalized_shape, but got ", name, " of shape ", list(t.shape),
                 " and normalized_shape = ", normalized_shape)
    _norm_check(t.device == input.device, op, name, " is on ", t.device, " but input is on ", input.device)
    low = input.dtype in (torch.float16, torch.bfloat16)
    _norm_check(t.dtype == input.dtype or (low and t.dtype == torch.float32), op, name, " has dtype ",
                _dtype_name(t.dtype), " but input has dtype ", _dtype_name(input.dtype), "; expected ",
                _dtype_name(input.dtype), " or Float" if low else "")


def check_norm_fwd_args(op: str, rms: bool, input: torch.Tensor, normalized_shape: Sequence[int],
                        weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                        device_type: Optional[str] = None) -> tuple[int, int, list[int]]:
    """Raise RuntimeError, as csrc/norm_host.cpp does; return (rows M, row length N, statistics' shape)."""
    shape = [int(s) for s in normalized_shape]
    nd = len(shape)
    _torch_check(nd >= 1, "Expected normalized_shape to be at least 1-dimensional, i.e., containing at least one "
                 "element, but got normalized_shape = ", shape)
    _check_norm_param(op, "weight", weight, input, shape)
    _check_norm_param(op, "bias", bias, input, shape)
    axis = input.dim() - nd
    _torch_check(axis >= 0 and list(input.shape[axis:]) == shape, "Given normalized_shape=", shape,
                 ", expected input with shape [*", "" if rms else ", ", ", ".join(map(str, shape)),
                 "], but got input of size", list(input.shape))
    if device_type is not None:
        _norm_check(input.device.type == device_type, op, "input is on ", input.device, ", expected a ",
                    device_type, " tensor")
    _norm_check(input.layout == torch.strided, op, "input is not a strided tensor")
    _norm_check(input.dtype in _NORM_DTYPES, op, "input has dtype ", _dtype_name(input.dtype),
                "; supported are float32, float64, float16 and bfloat16")
    if weight is not None and bias is not None:
        _norm_check(weight.dtype == bias.dtype, op, "weight has dtype ", _dtype_name(weight.dtype),
                    " but bias has dtype ", _dtype_name(bias.dtype))
    n = 1
    for s in shape:
        n *= s
    m = 1
    for s in input.shape[:axis]:
        m *= s
    return m, n, list(input.shape[:axis]) + [1] * nd


def check_norm_bwd_args(op: str, rms: bool, grad_out: torch.Tensor, input: torch.Tensor,
                        normalized_shape: Sequence[int], mean: Optional[torch.Tensor], rstd: torch.Tensor,
                        weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                        device_type: Optional[str] = None) -> tuple[int, int, list[int]]:
    """The forward checks, plus grad_out against input and the saved statistics."""
    m, n, stat_shape = check_norm_fwd_args(op, rms, input, normalized_shape, weight, bias, device_type)
    _norm_check(grad_out.shape == input.shape, op, "grad_out has shape ", list(grad_out.shape),
                " but input has shape ", list(input.shape))
    _norm_check(grad_out.dtype == input.dtype, op, "grad_out has dtype ", _dtype_name(grad_out.dtype),
                " but input has dtype ", _dtype_name(input.dtype))
    _norm_check(grad_out.device == input.device, op, "grad_out is on ", grad_out.device, " but input is on ",
                input.device)
    sd = norm_stat_dtype(input.dtype)
    for name, t in (("mean", None if rms else mean), ("rstd", rstd)):
        if t is None:
            continue
        _norm_check(t.numel() == m, op, name, " has ", t.numel(), " elements, expected one per row (", m, ")")
        _norm_check(t.dtype == sd, op, name, " has dtype ", _dtype_name(t.dtype), ", expected ", _dtype_name(sd))
        _norm_check(t.device == input.device, op, name, " is on ", t.device, " but input is on ", input.device)
    return m, n, stat_shape
