"""Pure-PyTorch versions of every op: the test oracle and the fallback.

Written from the ops' stated math in plain torch ops, one tensor at a time,
with no code shared with the kernels. Math in float32 for fp16/bf16/fp32
storage (float64 for fp64), states stored in the param's dtype.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from pyoptim._validation import (_dense, batch_norm_layout, check_adagrad_args, check_adam_args, check_lamb_norms,
                                 check_batch_norm_backward_elemt_args, check_batch_norm_backward_reduce_args,
                                 check_batch_norm_bwd_args, check_batch_norm_elemt_args, check_batch_norm_fwd_args,
                                 check_batch_norm_stats_args, check_clip_scale_args, check_lamb_args, check_lion_args,
                                 check_norm_args, check_norm_bwd_args, check_norm_fwd_args, check_rmsprop_args,
                                 check_sgd_args, group_l1, norm_stat_dtype, rms_norm_eps)


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


# -- the precision policy (csrc/include/pyoptim/precision.h), in plain torch integer ops ---------------------

_U32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """precision.h's mix32 on int64 tensors holding uint32 values (products wrap, then keep their low 32 bits)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _U32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _U32
    return x ^ (x >> 16)


def stochastic_key(seed: int, step: float, tensor: int) -> int:
    """precision.h's stochastic_key: the random stream of one tensor at one step (note [stochastic key])."""
    mix = lambda v: int(_mix32(torch.tensor(v & _U32, dtype=torch.int64)))
    k = mix(tensor + 0x9E3779B9)
    k = mix(k ^ (int(step) & _U32))
    k = mix(k ^ ((seed >> 32) & _U32))
    return mix(k ^ (seed & _U32))


def _memory_order_index(p: torch.Tensor) -> torch.Tensor:
    """Each element's index in the order the kernels walk it: memory order when p is dense, else row-major."""
    idx = torch.empty_like(p, dtype=torch.int64, device="cpu")  # p's strides when p is dense, else contiguous
    if _dense(p):
        torch.as_strided(idx, (p.numel(),), (1,), 0).copy_(torch.arange(p.numel()))
    else:
        idx.copy_(torch.arange(p.numel()).view(p.shape))
    return idx


def _bits(x: torch.Tensor) -> torch.Tensor:
    """A float32 tensor's bits as int64 values in [0, 2^32)."""
    return x.contiguous().view(torch.int32).to(torch.int64) & _U32


def _from_bits(u: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int64 tensor of bit patterns (16 or 32 bits) as `dtype` (bfloat16 or float32)."""
    if dtype == torch.float32:
        return torch.where(u >= 2**31, u - 2**32, u).to(torch.int32).view(torch.float32)
    return torch.where(u >= 2**15, u - 2**16, u).to(torch.int16).view(torch.bfloat16)


def param_fp32(p: torch.Tensor, i: int, master_params, param_remainders) -> torch.Tensor:
    """Param i's value in its math type: its fp32 master, or bf16 param + int16 remainder joined, or the param."""
    if master_params is not None:
        return master_params[i].float()
    if param_remainders is not None:
        hi = p.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
        rem = param_remainders[i].to(torch.int64)
        hi = (hi - (rem < 0).to(torch.int64)) & 0xFFFF  # note [remainder split]
        return _from_bits((hi << 16) | (rem & 0xFFFF), torch.float32).view(p.shape)
    return p.to(_opmath(p.dtype))


def write_param(p: torch.Tensor, i: int, value: torch.Tensor, master_params, param_remainders,
                key: Optional[int]) -> None:
    """Writes param i's new math-type value as its policy says (precision.h): master and param rounded to nearest,
    param and remainder split, param stochastically rounded with random stream `key`, or param rounded to nearest."""
    if master_params is not None:
        master_params[i].copy_(value)
        p.copy_(value)
    elif param_remainders is not None:
        u = _bits(value.float())
        low = u & 0xFFFF
        hi = ((u >> 16) + (low >= 0x8000).to(torch.int64)) & 0xFFFF
        p.copy_(_from_bits(hi, torch.bfloat16).view(p.shape))
        param_remainders[i].copy_(torch.where(low >= 2**15, low - 2**16, low).to(torch.int16).view(p.shape))
    elif key is not None:
        u = _bits(value.float())
        rand = _mix32(key ^ (_memory_order_index(p).to(u.device).reshape(u.shape) & _U32)) & 0xFFFF
        special = (u & 0x7F800000) == 0x7F800000
        nan = (u & 0x7FFFFFFF) > 0x7F800000
        rounded = torch.where(special, torch.where(nan, u | 0x400000, u), u + rand) >> 16
        p.copy_(_from_bits(rounded & 0xFFFF, torch.bfloat16).view(p.shape))
    else:
        p.copy_(value)


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
    l1_weight_decay: Sequence[float] = (),
    group_sizes: Sequence[int],
    amsgrad: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
    lr_tensor: Optional[torch.Tensor] = None,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
    grad_norm: Optional[torch.Tensor] = None,
    max_grad_norm: float = 0.0,
    master_params: Optional[Sequence[torch.Tensor]] = None,
    param_remainders: Optional[Sequence[torch.Tensor]] = None,
    stochastic_seed: Optional[int] = None,
) -> None:
    """One Adam/AdamW step over many tensors, in place (the contract of torch.ops.pyoptim.adam_step_)."""
    check_adam_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr=lr, beta1=beta1,
                    beta2=beta2, weight_decay=weight_decay, eps=eps, group_sizes=group_sizes, amsgrad=amsgrad,
                    l1_weight_decay=l1_weight_decay, lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
                    grad_norm=grad_norm, max_grad_norm=max_grad_norm, master_params=master_params,
                    param_remainders=param_remainders, stochastic_seed=stochastic_seed)
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
        param = param_fp32(p, i, master_params, param_remainders)
        grad = grads[i].to(ct) * grad_mul
        exp_avg = exp_avgs[i].to(ct)
        exp_avg_sq = exp_avg_sqs[i].to(ct)
        l1 = group_l1(l1_weight_decay, k)
        if l1 != 0:
            grad = grad + l1 * torch.sign(param)  # the gradient of l1 * |p| (sign(0) = 0)
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
        key = None if stochastic_seed is None else stochastic_key(stochastic_seed, step, i)
        write_param(p, i, param, master_params, param_remainders, key)
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
    l1_weight_decay: Sequence[float] = (),
    group_sizes: Sequence[int],
    nesterov: bool,
    maximize: bool,
    is_first_step: bool,
    lr_tensor: Optional[torch.Tensor] = None,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
    grad_norm: Optional[torch.Tensor] = None,
    max_grad_norm: float = 0.0,
    master_params: Optional[Sequence[torch.Tensor]] = None,
    param_remainders: Optional[Sequence[torch.Tensor]] = None,
    stochastic_seed: Optional[int] = None,
    state_steps: Optional[Sequence[torch.Tensor]] = None,
) -> None:
    """One SGD step over many tensors, in place (the contract of torch.ops.pyoptim.sgd_step_)."""
    check_sgd_args(params, grads, momentum_buffers, lr=lr, momentum=momentum, dampening=dampening,
                   weight_decay=weight_decay, group_sizes=group_sizes, nesterov=nesterov,
                   l1_weight_decay=l1_weight_decay, lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
                   grad_norm=grad_norm, max_grad_norm=max_grad_norm, master_params=master_params,
                   param_remainders=param_remainders, stochastic_seed=stochastic_seed, state_steps=state_steps)
    prelude = _step_prelude(params, group_sizes, lr, lr_tensor, grad_scale, found_inf, grad_norm, max_grad_norm,
                            maximize)
    if prelude is None:
        return
    grad_mul, group_of, lrs = prelude
    for i, p in enumerate(params):
        k = group_of[i]
        ct = _opmath(p.dtype)
        param = param_fp32(p, i, master_params, param_remainders)
        grad = grads[i].to(ct) * grad_mul
        l1 = group_l1(l1_weight_decay, k)
        if l1 != 0:
            grad = grad + l1 * torch.sign(param)
        if weight_decay[k] != 0:
            grad = grad + weight_decay[k] * param
        if len(momentum_buffers):
            if is_first_step:
                buf = grad.clone()
            else:
                buf = momentum_buffers[i].to(ct) * momentum[k] + (1 - dampening[k]) * grad
            momentum_buffers[i].copy_(buf)
            grad = grad + momentum[k] * buf if nesterov else buf
        step = None
        if state_steps is not None:
            state_steps[i].add_(1)
            step = state_steps[i].item()
        key = None if stochastic_seed is None else stochastic_key(stochastic_seed, step, i)
        write_param(p, i, param + (-lrs[k]) * grad, master_params, param_remainders, key)


def lion_step_ref(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    *,
    lr: Sequence[float],
    beta1: Sequence[float],
    beta2: Sequence[float],
    weight_decay: Sequence[float],
    l1_weight_decay: Sequence[float] = (),
    group_sizes: Sequence[int],
    maximize: bool,
    lr_tensor: Optional[torch.Tensor] = None,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
    grad_norm: Optional[torch.Tensor] = None,
    max_grad_norm: float = 0.0,
    master_params: Optional[Sequence[torch.Tensor]] = None,
    param_remainders: Optional[Sequence[torch.Tensor]] = None,
    stochastic_seed: Optional[int] = None,
    state_steps: Optional[Sequence[torch.Tensor]] = None,
) -> None:
    """One Lion step over many tensors, in place (the contract of torch.ops.pyoptim.lion_step_)."""
    check_lion_args(params, grads, exp_avgs, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay,
                    group_sizes=group_sizes, l1_weight_decay=l1_weight_decay, lr_tensor=lr_tensor,
                    grad_scale=grad_scale, found_inf=found_inf, grad_norm=grad_norm, max_grad_norm=max_grad_norm,
                    master_params=master_params, param_remainders=param_remainders, stochastic_seed=stochastic_seed,
                    state_steps=state_steps)
    prelude = _step_prelude(params, group_sizes, lr, lr_tensor, grad_scale, found_inf, grad_norm, max_grad_norm,
                            maximize)
    if prelude is None:
        return
    grad_mul, group_of, lrs = prelude
    for i, p in enumerate(params):
        k = group_of[i]
        ct = _opmath(p.dtype)
        param = param_fp32(p, i, master_params, param_remainders)
        grad = grads[i].to(ct) * grad_mul
        exp_avg = exp_avgs[i].to(ct)
        l1 = group_l1(l1_weight_decay, k)
        if l1 != 0:
            grad = grad + l1 * torch.sign(param)
        if weight_decay[k] != 0:
            param = param * (1 - lrs[k] * weight_decay[k])
        param = param + (-lrs[k]) * torch.sign(exp_avg * beta1[k] + (1 - beta1[k]) * grad)
        step = None
        if state_steps is not None:
            state_steps[i].add_(1)
            step = state_steps[i].item()
        key = None if stochastic_seed is None else stochastic_key(stochastic_seed, step, i)
        write_param(p, i, param, master_params, param_remainders, key)
        exp_avgs[i].copy_(exp_avg * beta2[k] + (1 - beta2[k]) * grad)


def _lamb_ref(op: str, params, grads, exp_avgs, exp_avg_sqs, state_steps, norms, *, lr, beta1, beta2, weight_decay,
              eps, l1_weight_decay, group_sizes, maximize, lr_tensor, grad_scale, found_inf, grad_norm,
              max_grad_norm, master_params=None, param_remainders=None,
              stochastic_seed=None) -> Optional[torch.Tensor]:
    """The passes of lamb_step_ that `op` makes (lamb_step_: both; lamb_moments_: the first, returning the
    norms; lamb_apply_: the second, from `norms`). p is read as its fp32 master (param_fp32) in both passes and
    written through the policy (write_param) by the second."""
    kwargs = dict(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, group_sizes=group_sizes,
                  l1_weight_decay=l1_weight_decay, lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
                  grad_norm=grad_norm, max_grad_norm=max_grad_norm, master_params=master_params,
                  param_remainders=param_remainders, stochastic_seed=stochastic_seed)
    check_lamb_args(params, grads, exp_avgs, exp_avg_sqs, state_steps, **kwargs, op=op)
    if op == "lamb_apply_":
        check_lamb_norms(op, norms, params)
    device = params[0].device if len(params) else None
    out = torch.zeros(2, len(params), dtype=torch.float64, device=device) if op == "lamb_moments_" else None
    prelude = _step_prelude(params, group_sizes, lr, lr_tensor, grad_scale, found_inf, grad_norm, max_grad_norm,
                            maximize)
    if prelude is None:
        return out
    grad_mul, group_of, lrs = prelude
    for i, p in enumerate(params):
        k = group_of[i]
        b1, b2 = beta1[k], beta2[k]
        ct = _opmath(p.dtype)
        param = param_fp32(p, i, master_params, param_remainders)
        if op != "lamb_apply_":
            state_steps[i].add_(1)
            grad = grads[i].to(ct) * grad_mul
            l1 = group_l1(l1_weight_decay, k)
            if l1 != 0:
                grad = grad + l1 * torch.sign(param)
            exp_avgs[i].copy_(exp_avgs[i].to(ct) * b1 + (1 - b1) * grad)
            exp_avg_sqs[i].copy_(exp_avg_sqs[i].to(ct) * b2 + (1 - b2) * grad * grad)
        step = state_steps[i].item()
        # u from m and v as stored, so that r is the ratio of the u applied
        exp_avg, exp_avg_sq = exp_avgs[i].to(ct), exp_avg_sqs[i].to(ct)
        update = (exp_avg / (1 - b1**step)) / ((exp_avg_sq / (1 - b2**step)).sqrt() + eps[k])
        if weight_decay[k] != 0:
            update = update + weight_decay[k] * param
        if op == "lamb_apply_":
            p_norm, u_norm = norms[0, i].sqrt(), norms[1, i].sqrt()
        else:
            p_norm = torch.linalg.vector_norm(param.double())
            u_norm = torch.linalg.vector_norm(update.double())
        if op == "lamb_moments_":
            out[0, i], out[1, i] = p_norm.square(), u_norm.square()
            continue
        ratio = (p_norm / u_norm).item() if p_norm > 0 and u_norm > 0 else 1.0
        key = None if stochastic_seed is None else stochastic_key(stochastic_seed, step, i)
        write_param(p, i, param + (-lrs[k] * ratio) * update, master_params, param_remainders, key)
    return out


def lamb_step_ref(
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
    group_sizes: Sequence[int],
    maximize: bool,
    lr_tensor: Optional[torch.Tensor] = None,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
    grad_norm: Optional[torch.Tensor] = None,
    max_grad_norm: float = 0.0,
    master_params: Optional[Sequence[torch.Tensor]] = None,
    param_remainders: Optional[Sequence[torch.Tensor]] = None,
    stochastic_seed: Optional[int] = None,
) -> None:
    """One LAMB step over many tensors, in place (the contract of torch.ops.pyoptim.lamb_step_)."""
    _lamb_ref("lamb_step_", params, grads, exp_avgs, exp_avg_sqs, state_steps, None, lr=lr, beta1=beta1,
              beta2=beta2, weight_decay=weight_decay, eps=eps, l1_weight_decay=l1_weight_decay,
              group_sizes=group_sizes, maximize=maximize, lr_tensor=lr_tensor, grad_scale=grad_scale,
              found_inf=found_inf, grad_norm=grad_norm, max_grad_norm=max_grad_norm, master_params=master_params,
              param_remainders=param_remainders, stochastic_seed=stochastic_seed)


def lamb_moments_ref(params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, beta1, beta2, weight_decay, eps,
                     l1_weight_decay=(), group_sizes, maximize, lr_tensor=None, grad_scale=None, found_inf=None,
                     grad_norm=None, max_grad_norm=0.0, master_params=None, param_remainders=None,
                     stochastic_seed=None) -> torch.Tensor:
    """LAMB's first pass, returning the [2, n] norms (the contract of torch.ops.pyoptim.lamb_moments_)."""
    return _lamb_ref("lamb_moments_", params, grads, exp_avgs, exp_avg_sqs, state_steps, None, lr=lr, beta1=beta1,
                     beta2=beta2, weight_decay=weight_decay, eps=eps, l1_weight_decay=l1_weight_decay,
                     group_sizes=group_sizes, maximize=maximize, lr_tensor=lr_tensor, grad_scale=grad_scale,
                     found_inf=found_inf, grad_norm=grad_norm, max_grad_norm=max_grad_norm,
                     master_params=master_params, param_remainders=param_remainders, stochastic_seed=stochastic_seed)


def lamb_apply_ref(params, grads, exp_avgs, exp_avg_sqs, state_steps, norms, *, lr, beta1, beta2, weight_decay, eps,
                   l1_weight_decay=(), group_sizes, maximize, lr_tensor=None, grad_scale=None, found_inf=None,
                   grad_norm=None, max_grad_norm=0.0, master_params=None, param_remainders=None,
                   stochastic_seed=None) -> None:
    """LAMB's second pass from the given norms (the contract of torch.ops.pyoptim.lamb_apply_)."""
    _lamb_ref("lamb_apply_", params, grads, exp_avgs, exp_avg_sqs, state_steps, norms, lr=lr, beta1=beta1,
              beta2=beta2, weight_decay=weight_decay, eps=eps, l1_weight_decay=l1_weight_decay,
              group_sizes=group_sizes, maximize=maximize, lr_tensor=lr_tensor, grad_scale=grad_scale,
              found_inf=found_inf, grad_norm=grad_norm, max_grad_norm=max_grad_norm, master_params=master_params,
              param_remainders=param_remainders, stochastic_seed=stochastic_seed)


def adagrad_step_ref(
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
    group_sizes: Sequence[int],
    maximize: bool,
    lr_tensor: Optional[torch.Tensor] = None,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
    grad_norm: Optional[torch.Tensor] = None,
    max_grad_norm: float = 0.0,
    master_params: Optional[Sequence[torch.Tensor]] = None,
    param_remainders: Optional[Sequence[torch.Tensor]] = None,
    stochastic_seed: Optional[int] = None,
) -> None:
    """One Adagrad step over many tensors, in place (the contract of torch.ops.pyoptim.adagrad_step_)."""
    check_adagrad_args(params, grads, state_sums, state_steps, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                       eps=eps, group_sizes=group_sizes, l1_weight_decay=l1_weight_decay, lr_tensor=lr_tensor,
                       grad_scale=grad_scale, found_inf=found_inf, grad_norm=grad_norm, max_grad_norm=max_grad_norm,
                       master_params=master_params, param_remainders=param_remainders,
                       stochastic_seed=stochastic_seed)
    prelude = _step_prelude(params, group_sizes, lr, lr_tensor, grad_scale, found_inf, grad_norm, max_grad_norm,
                            maximize)
    if prelude is None:
        return
    grad_mul, group_of, lrs = prelude
    for i, p in enumerate(params):
        k = group_of[i]
        state_steps[i].add_(1)
        step = state_steps[i].item()
        clr = lrs[k] / (1 + (step - 1) * lr_decay[k])
        ct = _opmath(p.dtype)
        param = param_fp32(p, i, master_params, param_remainders)
        grad = grads[i].to(ct) * grad_mul
        l1 = group_l1(l1_weight_decay, k)
        if l1 != 0:
            grad = grad + l1 * torch.sign(param)  # the gradient of l1 * |p| (sign(0) = 0)
        if weight_decay[k] != 0:
            grad = grad + weight_decay[k] * param
        state_sum = state_sums[i].to(ct) + grad * grad
        state_sums[i].copy_(state_sum)
        key = None if stochastic_seed is None else stochastic_key(stochastic_seed, step, i)
        write_param(p, i, param + (-clr) * grad / (state_sum.sqrt() + eps[k]), master_params, param_remainders, key)


def rmsprop_step_ref(
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
    group_sizes: Sequence[int],
    centered: bool,
    maximize: bool,
    lr_tensor: Optional[torch.Tensor] = None,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
    grad_norm: Optional[torch.Tensor] = None,
    max_grad_norm: float = 0.0,
    master_params: Optional[Sequence[torch.Tensor]] = None,
    param_remainders: Optional[Sequence[torch.Tensor]] = None,
    stochastic_seed: Optional[int] = None,
) -> None:
    """One RMSprop step over many tensors, in place (the contract of torch.ops.pyoptim.rmsprop_step_)."""
    check_rmsprop_args(params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps, lr=lr, alpha=alpha,
                       eps=eps, weight_decay=weight_decay, momentum=momentum, group_sizes=group_sizes,
                       centered=centered, l1_weight_decay=l1_weight_decay, lr_tensor=lr_tensor, grad_scale=grad_scale,
                       found_inf=found_inf, grad_norm=grad_norm, max_grad_norm=max_grad_norm,
                       master_params=master_params, param_remainders=param_remainders,
                       stochastic_seed=stochastic_seed)
    prelude = _step_prelude(params, group_sizes, lr, lr_tensor, grad_scale, found_inf, grad_norm, max_grad_norm,
                            maximize)
    if prelude is None:
        return
    grad_mul, group_of, lrs = prelude
    for i, p in enumerate(params):
        k = group_of[i]
        state_steps[i].add_(1)  # counted; no formula reads it, stochastic rounding's draws hash it
        key = None if stochastic_seed is None else stochastic_key(stochastic_seed, state_steps[i].item(), i)
        ct = _opmath(p.dtype)
        param = param_fp32(p, i, master_params, param_remainders)
        grad = grads[i].to(ct) * grad_mul
        l1 = group_l1(l1_weight_decay, k)
        if l1 != 0:
            grad = grad + l1 * torch.sign(param)  # the gradient of l1 * |p| (sign(0) = 0)
        if weight_decay[k] != 0:
            grad = grad + weight_decay[k] * param
        square_avg = square_avgs[i].to(ct) * alpha[k] + (1 - alpha[k]) * grad * grad
        square_avgs[i].copy_(square_avg)
        if centered:
            grad_avg = torch.lerp(grad_avgs[i].to(ct), grad, 1 - alpha[k])
            grad_avgs[i].copy_(grad_avg)
            avg = (square_avg - grad_avg * grad_avg).sqrt() + eps[k]
        else:
            avg = square_avg.sqrt() + eps[k]
        if len(momentum_buffers):
            buf = momentum_buffers[i].to(ct) * momentum[k] + grad / avg
            momentum_buffers[i].copy_(buf)
            param = param + (-lrs[k]) * buf
        else:
            param = param + (-lrs[k]) * grad / avg
        write_param(p, i, param, master_params, param_remainders, key)


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
#   mean = x0 + sum(x - x0) / N (x0 the row's first element; 0 for RMSNorm),
#   var = sum((x - mean)^2) / N
#   rstd = 1 / sqrt(var + eps), xhat = (x - mean) * rstd, y = xhat * w + b
#   g = dy * w, c1 = sum(g) / N (0 for RMSNorm), c2 = sum(g * xhat) / N
#   dx = rstd * (g - c1 - xhat * c2), dw = sum_rows(dy * xhat), db = sum_rows(dy)


def _norm_fwd(op: str, rms: bool, input: torch.Tensor, normalized_shape: Sequence[int],
              weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float):
    _, _, stat_shape = check_norm_fwd_args(op, rms, input, normalized_shape, weight, bias)
    ct = _opmath(input.dtype)
    dims = tuple(range(input.dim() - len(normalized_shape), input.dim()))
    x = input.to(ct)
    if rms:
        mean = torch.zeros(stat_shape, dtype=ct, device=input.device)
    else:  # note [shifted mean]: x0 + sum(x - x0) / N, x0 each row's first element
        x0 = x.flatten(dims[0])[..., :1].reshape(x.shape[:dims[0]] + (1,) * len(dims)) if x.numel() else x.sum(
            dims, keepdim=True)
        mean = x0 + (x - x0).mean(dims, keepdim=True)
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


# The contract of the BatchNorm ops (csrc/ops.cpp), from the math of
# csrc/include/pyoptim/batch_norm.h, per channel c over count = N * S elements:
#   mean = sum(x) / count, m2 = sum((x - mean)^2), invstd = 1 / sqrt(m2 / count + eps)
#   y = (x - mean) * scale + b, scale = invstd * w
#   running' = (1 - momentum) * running + momentum * batch (the variance: m2 / (count - 1))
#   sum_dy = sum(dy), sum_dy_xmu = sum(dy * (x - mean))
#   dx = (dy - mean_dy - (x - mean) * invstd^2 * mean_dy_xmu) * scale (training; eval: dy * scale)
# Outputs shaped like the input are empty_like(the input as the kernels read
# it), so they keep its layout; per-channel results are 1-d [C].


def _bn_dims(input: torch.Tensor) -> tuple[int, ...]:
    """The dims a per-channel reduction runs over: all but dim 1."""
    return (0,) + tuple(range(2, input.dim()))


def _bn_channel(t: torch.Tensor, input: torch.Tensor, ct: torch.dtype) -> torch.Tensor:
    """A per-channel tensor [C] in the math type, shaped to broadcast against (N, C, *) input."""
    return t.to(ct).reshape([1, -1] + [1] * (input.dim() - 2))


def _bn_like(value: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    """`value` stored as the op's output shaped like `input`: input's dtype, the layout the kernels read it in."""
    out = torch.empty_like(batch_norm_layout(input))
    out.copy_(value)
    return out


def _bn_sums(input: torch.Tensor, count: int, ct: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, m2) per channel, two-pass; zeros for a channel with no elements."""
    c = input.shape[1]
    if count == 0:
        zeros = torch.zeros(c, dtype=ct, device=input.device)
        return zeros, zeros.clone()
    x = input.to(ct)
    mean = x.mean(_bn_dims(input))
    m2 = (x - _bn_channel(mean, input, ct)).square().sum(_bn_dims(input))
    return mean, m2


def _bn_elemt(input: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
              mean: torch.Tensor, invstd: torch.Tensor, ct: torch.dtype) -> torch.Tensor:
    """y = (x - mean) * scale + b, scale = invstd * w, in the math type."""
    scale = invstd.to(ct) * weight.to(ct) if weight is not None else invstd.to(ct)
    y = (input.to(ct) - _bn_channel(mean, input, ct)) * _bn_channel(scale, input, ct)
    if bias is not None:
        y = y + _bn_channel(bias, input, ct)
    return _bn_like(y, input)


def batch_norm_fwd_ref(input: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                       running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor], training: bool,
                       momentum: float, eps: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, save_mean, save_invstd, new_running_mean, new_running_var) (the contract of pyoptim::batch_norm_fwd)."""
    n, c, s = check_batch_norm_fwd_args("batch_norm_fwd", input, weight, bias, running_mean, running_var, training,
                                        True)
    ct = _opmath(input.dtype)
    count = n * s
    empty = input.new_empty(0)
    new_mean, new_var = empty, empty.clone()
    if training:
        mean, m2 = _bn_sums(input, count, ct)
        if count == 0:
            # torch leaves the running statistics untouched; the saved ones are 0.
            invstd = torch.zeros(c, dtype=ct, device=input.device)
            if running_mean is not None:
                new_mean, new_var = running_mean.clone(), running_var.clone()
        else:
            invstd = 1.0 / torch.sqrt(m2 / count + eps)
            if running_mean is not None:
                # m2 / (count - 1) with count = 1 is 0 / 0 = nan, as torch's.
                unbiased = m2 / torch.tensor(count - 1, dtype=ct, device=input.device)
                # In the running statistics' own shape and dtype (any shape of C elements passes the checks).
                new_mean = ((1 - momentum) * running_mean.to(ct).reshape(c) + momentum * mean).to(
                    running_mean.dtype).reshape(running_mean.shape)
                new_var = ((1 - momentum) * running_var.to(ct).reshape(c) + momentum * unbiased).to(
                    running_var.dtype).reshape(running_var.shape)
    else:
        mean = running_mean.to(ct, copy=True)  # an output never aliases an input (the schema says so)
        invstd = 1.0 / torch.sqrt(running_var.to(ct) + eps)
    mean, invstd = mean.reshape(c), invstd.reshape(c)
    out = _bn_elemt(input, weight, bias, mean, invstd, ct)
    sd = norm_stat_dtype(input.dtype)
    return out, mean.to(sd), invstd.to(sd), new_mean, new_var


def _bn_backward_sums(grad_out: torch.Tensor, input: torch.Tensor, mean: torch.Tensor,
                      ct: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_dy, sum_dy_xmu) per channel in the math type."""
    dy = grad_out.to(ct)
    xmu = input.to(ct) - _bn_channel(mean, input, ct)
    return dy.sum(_bn_dims(input)), (dy * xmu).sum(_bn_dims(input))


def _bn_backward_elemt(grad_out: torch.Tensor, input: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                       weight: Optional[torch.Tensor], mean_dy: Optional[torch.Tensor],
                       mean_dy_xmu: Optional[torch.Tensor], ct: torch.dtype) -> torch.Tensor:
    """dx = (dy - mean_dy - (x - mean) * invstd^2 * mean_dy_xmu) * invstd * w; without mean_dy: dy * invstd * w."""
    r = invstd.to(ct)
    scale = r * weight.to(ct) if weight is not None else r
    g = grad_out.to(ct)
    if mean_dy is not None:
        proj = r * r * mean_dy_xmu.to(ct)
        g = g - _bn_channel(mean_dy, input, ct) - (input.to(ct) - _bn_channel(mean, input, ct)) * _bn_channel(
            proj, input, ct)
    return _bn_like(g * _bn_channel(scale, input, ct), input)


def batch_norm_bwd_ref(grad_out: torch.Tensor, input: torch.Tensor, weight: Optional[torch.Tensor],
                       save_mean: torch.Tensor, save_invstd: torch.Tensor, training: bool,
                       output_mask: Sequence[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_input, grad_weight, grad_bias) of BatchNorm (the contract of torch.ops.pyoptim.batch_norm_bwd)."""
    n, c, s = check_batch_norm_bwd_args(grad_out, input, weight, save_mean, save_invstd, training)
    ct = _opmath(input.dtype)
    count = n * s
    sum_dy, sum_dy_xmu = _bn_backward_sums(grad_out, input, save_mean, ct)
    empty = input.new_empty(0)
    dx = empty
    if output_mask[0]:
        if training and count > 0:
            dx = _bn_backward_elemt(grad_out, input, save_mean, save_invstd, weight, sum_dy / count,
                                    sum_dy_xmu / count, ct)
        else:
            dx = _bn_backward_elemt(grad_out, input, save_mean, save_invstd, weight, None, None, ct)
    wdtype = weight.dtype if weight is not None else input.dtype
    dw = (sum_dy_xmu * save_invstd.to(ct)).to(wdtype) if output_mask[1] and weight is not None else input.new_empty(0)
    db = sum_dy.to(wdtype) if output_mask[2] else input.new_empty(0)
    return dx, dw, db


def batch_norm_stats_ref(input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, m2) per channel (the contract of torch.ops.pyoptim.batch_norm_stats)."""
    n, _, s = check_batch_norm_stats_args(input)
    mean, m2 = _bn_sums(input, n * s, _opmath(input.dtype))
    sd = norm_stat_dtype(input.dtype)
    return mean.to(sd), m2.to(sd)


def batch_norm_elemt_ref(input: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                         mean: torch.Tensor, invstd: torch.Tensor) -> torch.Tensor:
    """(x - mean) * invstd * weight + bias (the contract of torch.ops.pyoptim.batch_norm_elemt)."""
    check_batch_norm_elemt_args(input, weight, bias, mean, invstd)
    return _bn_elemt(input, weight, bias, mean, invstd, _opmath(input.dtype))


def batch_norm_backward_reduce_ref(grad_out: torch.Tensor, input: torch.Tensor,
                                   mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_dy, sum_dy_xmu) per channel (the contract of torch.ops.pyoptim.batch_norm_backward_reduce)."""
    check_batch_norm_backward_reduce_args(grad_out, input, mean)
    sum_dy, sum_dy_xmu = _bn_backward_sums(grad_out, input, mean, _opmath(input.dtype))
    sd = norm_stat_dtype(input.dtype)
    return sum_dy.to(sd), sum_dy_xmu.to(sd)


def batch_norm_backward_elemt_ref(grad_out: torch.Tensor, input: torch.Tensor, mean: torch.Tensor,
                                  invstd: torch.Tensor, weight: Optional[torch.Tensor], mean_dy: torch.Tensor,
                                  mean_dy_xmu: torch.Tensor) -> torch.Tensor:
    """grad_input of BatchNorm in training from global means (the contract of pyoptim::batch_norm_backward_elemt)."""
    check_batch_norm_backward_elemt_args(grad_out, input, mean, invstd, weight, mean_dy, mean_dy_xmu)
    return _bn_backward_elemt(grad_out, input, mean, invstd, weight, mean_dy, mean_dy_xmu, _opmath(input.dtype))
