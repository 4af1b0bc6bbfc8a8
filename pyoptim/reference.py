"""Pure-PyTorch versions of every op: the test oracle and the fallback.

Written from the ops' stated math in plain torch ops, one tensor at a time,
with no code shared with the kernels. Math in float32 for fp16/bf16/fp32
storage (float64 for fp64), states stored in the param's dtype.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from pyoptim._validation import (check_adam_args, check_clip_scale_args, check_norm_args, check_norm_bwd_args,
                                 check_norm_fwd_args, check_sgd_args, norm_stat_dtype, rms_norm_eps)


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grad_multiplier(grad_scale: Optional[torch.Tensor], grad_norm: Optional[torch.Tensor], max_grad_norm: float,
                     maximize: bool) -> float:
    """GradScaler's inverse scale x torch.nn.utils.clip_grad_norm_'s factor x maximize's sign."""
    inv_scale = torch.ones((), dtype=torch.float32)
    if grad_scale is not None:
        inv_scale = grad_scale.double().reciprocal().float().cpu()  # as GradScaler computes it
    mul = inv_scale.double()
    if grad_norm is not None:
        total = grad_norm.cpu().float() * inv_scale  # the unscaled grads' norm
        mul = mul * torch.clamp(max_grad_norm / (total + 1e-6), max=1.0).double()
    return -mul.item() if maximize else mul.item()


def _step_prelude(params, group_sizes, lr, lr_tensor, grad_scale, found_inf, grad_norm, max_grad_norm, maximize):
    """(grad multiplier, group of each tensor, lr of each group) of a step op, or None when it changes nothing."""
    if len(params) == 0:
        return None
    if found_inf is not None and found_inf.item() != 0.0:
        return None  # a step with inf/nan grads changes nothing
    grad_mul = _grad_multiplier(grad_scale, grad_norm, max_grad_norm, maximize)
    group_of = [k for k, size in enumerate(group_sizes) for _ in range(size)]
    lrs = lr_tensor.tolist() if lr_tensor is not None else list(lr)
    return grad_mul, group_of, lrs


def adam_step_ref(
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
    maximize: bool,
    decoupled_weight_decay: bool,
    lr_tensor: Optional[torch.Tensor] = None,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
    grad_norm: Optional[torch.Tensor] = None,
    max_grad_norm: float = 0.0,
) -> None:
    """One Adam/AdamW step over many tensors, in place (the contract of torch.ops.pyoptim.adam_step_)."""
    check_adam_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr=lr, beta1=beta1,
                    beta2=beta2, weight_decay=weight_decay, eps=eps, group_sizes=group_sizes, amsgrad=amsgrad,
                    lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf, grad_norm=grad_norm,
                    max_grad_norm=max_grad_norm)
    prelude = _step_prelude(params, group_sizes, lr, lr_tensor, grad_scale, found_inf, grad_norm, max_grad_norm,
                            maximize)
    if prelude is None:
        return
    grad_mul, group_of, lrs = prelude
    for i, p in enumerate(params):
        k = group_of[i]
        lr_k, b1, b2, wd, eps_k = lrs[k], beta1[k], beta2[k], weight_decay[k], eps[k]
        state_steps[i].add_(1)
        step = state_steps[i].item()
        ct = _opmath(p.dtype)
        param = p.to(ct)
        grad = grads[i].to(ct) * grad_mul
        exp_avg = exp_avgs[i].to(ct)
        exp_avg_sq = exp_avg_sqs[i].to(ct)
        if wd != 0:
            if decoupled_weight_decay:
                param = param * (1 - lr_k * wd)
            else:
                grad = grad + wd * param
        exp_avg = torch.lerp(exp_avg, grad, 1 - b1)
        exp_avg_sq = exp_avg_sq * b2 + (1 - b2) * grad * grad
        bias_correction1 = 1 - b1**step
        bias_correction2_sqrt = (1 - b2**step) ** 0.5
        second = exp_avg_sq
        if amsgrad:
            second = torch.maximum(max_exp_avg_sqs[i].to(ct), exp_avg_sq)
            max_exp_avg_sqs[i].copy_(second)
        denom = second.sqrt() / bias_correction2_sqrt + eps_k
        param = param + (-(lr_k / bias_correction1)) * exp_avg / denom
        p.copy_(param)
        exp_avgs[i].copy_(exp_avg)
        exp_avg_sqs[i].copy_(exp_avg_sq)


def sgd_step_ref(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor],
    *,
    lr: Sequence[float],
    momentum: Sequence[float],
    dampening: Sequence[float],
    weight_decay: Sequence[float],
    group_sizes: Sequence[int],
    nesterov: bool,
    maximize: bool,
    is_first_step: bool,
    lr_tensor: Optional[torch.Tensor] = None,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
    grad_norm: Optional[torch.Tensor] = None,
    max_grad_norm: float = 0.0,
) -> None:
    """One SGD step over many tensors, in place (the contract of torch.ops.pyoptim.sgd_step_)."""
    check_sgd_args(params, grads, momentum_buffers, lr=lr, momentum=momentum, dampening=dampening,
                   weight_decay=weight_decay, group_sizes=group_sizes, nesterov=nesterov, lr_tensor=lr_tensor,
                   grad_scale=grad_scale, found_inf=found_inf, grad_norm=grad_norm, max_grad_norm=max_grad_norm)
    prelude = _step_prelude(params, group_sizes, lr, lr_tensor, grad_scale, found_inf, grad_norm, max_grad_norm,
                            maximize)
    if prelude is None:
        return
    grad_mul, group_of, lrs = prelude
    for i, p in enumerate(params):
        k = group_of[i]
        ct = _opmath(p.dtype)
        param = p.to(ct)
        grad = grads[i].to(ct) * grad_mul
        if weight_decay[k] != 0:
            grad = grad + weight_decay[k] * param
        if len(momentum_buffers):
            if is_first_step:
                buf = grad.clone()
            else:
                buf = momentum_buffers[i].to(ct) * momentum[k] + (1 - dampening[k]) * grad
            momentum_buffers[i].copy_(buf)
            grad = grad + momentum[k] * buf if nesterov else buf
        p.copy_(param + (-lrs[k]) * grad)


def multi_tensor_norm_ref(tensors: Sequence[torch.Tensor], norm_type: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(total norm, per-tensor norms) of many tensors, float32, accumulated in float64."""
    check_norm_args(tensors, norm_type)
    if len(tensors) == 0:
        return torch.zeros(()), torch.zeros(0)
    device = tensors[0].device
    per = torch.stack([torch.linalg.vector_norm(t.detach().double(), norm_type) if t.numel()
                       else torch.zeros((), dtype=torch.float64, device=device) for t in tensors])
    total = torch.linalg.vector_norm(per, norm_type)
    return total.float(), per.float()


def clip_scale_ref(tensors: Sequence[torch.Tensor], total_norm: torch.Tensor, max_norm: float) -> None:
    """Scale every tensor in place by min(1, max_norm / (total_norm + 1e-6)), as clip_grad_norm_ does."""
    check_clip_scale_args(tensors, total_norm, max_norm)
    if len(tensors) == 0:
        return
    coef = torch.clamp(max_norm / (total_norm.float() + 1e-6), max=1.0)
    for t in tensors:
        t.mul_(coef.to(t.device))


# The contract of torch.ops.pyoptim.layer_norm_fwd/_bwd and rms_norm_fwd/_bwd
# (csrc/ops.cpp), from the math of csrc/include/pyoptim/layer_norm.h:
#   mean = sum(x) / N (0 for RMSNorm), var = sum((x - mean)^2) / N
#   rstd = 1 / sqrt(var + eps), xhat = (x - mean) * rstd, y = xhat * w + b
#   g = dy * w, c1 = sum(g) / N (0 for RMSNorm), c2 = sum(g * xhat) / N
#   dx = rstd * (g - c1 - xhat * c2), dw = sum_rows(dy * xhat), db = sum_rows(dy)


def _norm_fwd(op: str, rms: bool, input: torch.Tensor, normalized_shape: Sequence[int],
              weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float):
    _, _, stat_shape = check_norm_fwd_args(op, rms, input, normalized_shape, weight, bias)
    ct = _opmath(input.dtype)
    dims = tuple(range(input.dim() - len(normalized_shape), input.dim()))
    x = input.to(ct)
    mean = torch.zeros(stat_shape, dtype=ct, device=input.device) if rms else x.mean(dims, keepdim=True)
    var = (x - mean).square().mean(dims, keepdim=True)
    rstd = 1.0 / torch.sqrt(var.clamp_min(0) + eps)
    y = (x - mean) * rstd
    if weight is not None:
        y = y * weight.to(ct)
    if bias is not None:
        y = y + bias.to(ct)
    sd = norm_stat_dtype(input.dtype)
    return y.to(input.dtype).contiguous(), mean.to(sd).reshape(stat_shape), rstd.to(sd).reshape(stat_shape)


def _norm_bwd(op: str, rms: bool, grad_out: torch.Tensor, input: torch.Tensor, normalized_shape: Sequence[int],
              mean: Optional[torch.Tensor], rstd: torch.Tensor, weight: Optional[torch.Tensor],
              bias: Optional[torch.Tensor], output_mask: Sequence[bool]):
    _, n, stat_shape = check_norm_bwd_args(op, rms, grad_out, input, normalized_shape, mean, rstd, weight, bias)
    ct = _opmath(input.dtype)
    nd = len(normalized_shape)
    dims = tuple(range(input.dim() - nd, input.dim()))
    rows = tuple(range(input.dim() - nd))
    x, dy = input.to(ct), grad_out.to(ct)
    mu = 0.0 if rms else mean.to(ct).reshape(stat_shape)
    r = rstd.to(ct).reshape(stat_shape)
    xhat = (x - mu) * r
    g = dy * weight.to(ct) if weight is not None else dy
    c2 = (g * xhat).sum(dims, keepdim=True) / n
    dx = r * (g - xhat * c2) if rms else r * (g - g.sum(dims, keepdim=True) / n - xhat * c2)
    empty = input.new_empty(0)
    wdtype = weight.dtype if weight is not None else (bias.dtype if bias is not None else input.dtype)
    dw = (dy * xhat).sum(rows).to(wdtype) if output_mask[1] and weight is not None else empty
    db = dy.sum(rows).to(wdtype) if len(output_mask) > 2 and output_mask[2] and bias is not None else empty
    return (dx.to(input.dtype).contiguous() if output_mask[0] else empty), dw, db


def layer_norm_fwd_ref(input: torch.Tensor, normalized_shape: Sequence[int], weight: Optional[torch.Tensor],
                       bias: Optional[torch.Tensor], eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, mean, rstd) of LayerNorm (the contract of torch.ops.pyoptim.layer_norm_fwd)."""
    return _norm_fwd("layer_norm_fwd", False, input, normalized_shape, weight, bias, eps)


def layer_norm_bwd_ref(grad_out: torch.Tensor, input: torch.Tensor, normalized_shape: Sequence[int],
                       mean: torch.Tensor, rstd: torch.Tensor, weight: Optional[torch.Tensor],
                       bias: Optional[torch.Tensor], output_mask: Sequence[bool]
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_input, grad_weight, grad_bias) of LayerNorm (the contract of torch.ops.pyoptim.layer_norm_bwd)."""
    return _norm_bwd("layer_norm_bwd", False, grad_out, input, normalized_shape, mean, rstd, weight, bias,
                     output_mask)


def rms_norm_fwd_ref(input: torch.Tensor, normalized_shape: Sequence[int], weight: Optional[torch.Tensor],
                     eps: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, rstd) of RMSNorm (the contract of torch.ops.pyoptim.rms_norm_fwd)."""
    out, _, rstd = _norm_fwd("rms_norm_fwd", True, input, normalized_shape, weight, None,
                             rms_norm_eps(eps, input.dtype))
    return out, rstd


def rms_norm_bwd_ref(grad_out: torch.Tensor, input: torch.Tensor, normalized_shape: Sequence[int],
                     rstd: torch.Tensor, weight: Optional[torch.Tensor], output_mask: Sequence[bool]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_input, grad_weight) of RMSNorm (the contract of torch.ops.pyoptim.rms_norm_bwd)."""
    dx, dw, _ = _norm_bwd("rms_norm_bwd", True, grad_out, input, normalized_shape, None, rstd, weight, None,
                          output_mask)
    return dx, dw
