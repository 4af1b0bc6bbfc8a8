"""Argument checks of the ops, for the backends written in Python.

The C++ backends run the same checks (csrc/multi_tensor_host.cpp,
csrc/optim_host.cpp, csrc/norm_host.cpp, csrc/batch_norm_host.cpp), with the
same messages; the fake (meta) kernels and the
triton and reference backends run these. Every check runs before anything is
written.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)  # what every kernel takes


def _dtype_name(dtype: torch.dtype) -> str:
    # c10's names, as the C++ checks print them.
    return {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
            torch.bfloat16: "BFloat16", torch.int16: "Short"}.get(dtype, str(dtype).replace("torch.", ""))


def _check(cond: bool, op: str, *msg: object) -> None:
    if not cond:
        raise RuntimeError(f"{op}: " + "".join(str(m) for m in msg))


def _dense(t: torch.Tensor) -> bool:
    """TensorImpl::is_non_overlapping_and_dense: its elements fill a block of memory, in some order of dims."""
    expected = 1
    for size, stride in sorted((d for d in zip(t.shape, t.stride()) if d[0] != 1), key=lambda d: d[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _shares_memory(t: torch.Tensor, p: torch.Tensor) -> bool:
    """Whether t and p overlap in memory, as the C++ checks judge it (at::get_overlap_status): dense tensors of
    one storage whose byte ranges intersect; tensors it cannot judge (either not dense, or empty) pass."""
    if t.numel() == 0 or p.numel() == 0 or t.device != p.device or t.device.type == "meta":
        return False
    try:
        base = t.untyped_storage().data_ptr()
        if base == 0 or base != p.untyped_storage().data_ptr():
            return False
    except RuntimeError:  # no data to alias: fake tensors (torch.compile's tracing, the fake kernels)
        return False
    if not (_dense(t) and _dense(p)):
        return False
    t0, p0 = t.data_ptr(), p.data_ptr()
    return t0 < p0 + p.numel() * p.element_size() and p0 < t0 + t.numel() * t.element_size()


def check_tensor_lists(op: str, params_name: str, params: Sequence[torch.Tensor],
                       like: dict[str, Sequence[torch.Tensor]], device_type: Optional[str] = None,
                       state: Optional[dict[str, Sequence[torch.Tensor]]] = None) -> None:
    """params: one device and one floating dtype; each non-empty list in `like` matches params entry by entry.

    The lists of `state` (an optimizer's moments) match params as `like`'s but in their dtype: one state dtype
    per call, params' own, float32 or bfloat16 (note [state dtype]).
    """
    n = len(params)
    state = state or {}
    state_dtype = next((lst[0].dtype for lst in state.values() if len(lst) > 0 and lst[0] is not None), None)
    like = dict(like, **state)
    for name, lst in like.items():
        _check(len(lst) == 0 or len(lst) == n, op, name, " has ", len(lst), " entries but ", params_name, " has ", n)
    if n == 0:
        return
    p0 = params[0]
    for i, p in enumerate(params):
        _check(p is not None, op, params_name, "[", i, "] is undefined")
        _check(p.layout == torch.strided, op, params_name, "[", i, "] is not a strided tensor (layout ", p.layout, ")")
        if device_type is not None:
            _check(p.device.type == device_type, op, params_name, "[", i, "] is on ", p.device, ", expected a ",
                   device_type, " tensor")
        _check(p.device == p0.device, op, params_name, "[", i, "] is on ", p.device, " but ", params_name,
               "[0] is on ", p0.device, "; one call takes one device")
        _check(p.dtype in FLOAT_DTYPES, op, params_name, "[", i, "] has dtype ", _dtype_name(p.dtype),
               "; supported are float32, float64, float16 and bfloat16")
        _check(p.dtype == p0.dtype, op, params_name, "[", i, "] has dtype ", _dtype_name(p.dtype), " but ", params_name,
               "[0] has ", _dtype_name(p0.dtype), "; one call takes one dtype")
        for name, lst in like.items():
            if len(lst) == 0:
                continue
            t = lst[i]
            _check(t is not None, op, name, "[", i, "] is undefined")
            _check(t.layout == torch.strided, op, name, "[", i, "] is sparse (layout ", t.layout,
                   "); sparse gradients are not supported")
            _check(t.device == p.device, op, name, "[", i, "] is on ", t.device, " but ", params_name, "[", i,
                   "] is on ", p.device)
            if name in state:
                _check(t.dtype == state_dtype and (t.dtype == p.dtype or (
                    p.dtype != torch.float64 and t.dtype in (torch.float32, torch.bfloat16))), op, name, "[", i,
                       "] has dtype ", _dtype_name(t.dtype), "; the state of ", params_name, " of dtype ",
                       _dtype_name(p.dtype), " is one dtype per call: ", _dtype_name(p.dtype),
                       ", or Float or BFloat16 beside 16-bit and Float params (got ", _dtype_name(state_dtype),
                       " first)")
            else:
                _check(t.dtype == p.dtype, op, name, "[", i, "] has dtype ", _dtype_name(t.dtype), " but ",
                       params_name, "[", i, "] has dtype ", _dtype_name(p.dtype))
            _check(t.shape == p.shape, op, name, "[", i, "] has shape ", list(t.shape), " but ", params_name, "[",
                   i, "] has shape ", list(p.shape))
            _check(not _shares_memory(t, p), op, name, "[", i, "] shares memory with ", params_name, "[", i,
                   "], which the step writes while reading it (a grad set to its param's data?)")


def check_group_lists(op: str, group_sizes: Sequence[int], hyper: dict[str, Sequence[float]], n: int) -> None:
    """One value per group in every hyperparameter list; group_sizes add up to n."""
    groups = len(group_sizes)
    for name, values in hyper.items():
        _check(len(values) == groups, op, name, " has ", len(values), " values for ", groups,
               " groups; one value per group")
    for k, size in enumerate(group_sizes):
        _check(size >= 0, op, "group_sizes[", k, "] is negative")
    _check(sum(group_sizes) == n, op, "group_sizes add up to ", sum(group_sizes), " but there are ", n, " params")


def check_aux_tensor(op: str, name: str, t: Optional[torch.Tensor], device: torch.device, numel: int,
                     dtype: torch.dtype) -> None:
    """An optional tensor of `numel` elements, of `dtype`, on `device`."""
    if t is None:
        return
    _check(t.device == device, op, name, " is on ", t.device, " but params are on ", device)
    _check(t.dtype == dtype, op, name, " must be ", _dtype_name(dtype), ", got ", _dtype_name(t.dtype))
    _check(t.numel() == numel, op, name, " must have ", numel, " element(s), got ", t.numel())


def check_step_aux(op: str, params: Sequence[torch.Tensor], groups: int, lr_tensor: Optional[torch.Tensor],
                   grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor],
                   grad_norm: Optional[torch.Tensor], max_grad_norm: float) -> None:
    """The arguments every step op takes after its lists (csrc/optim_host.cpp's check_step_aux)."""
    if len(params) == 0:
        return
    device = params[0].device
    check_aux_tensor(op, "lr_tensor", lr_tensor, device, groups, torch.float64)
    check_aux_tensor(op, "grad_scale", grad_scale, device, 1, torch.float32)
    check_aux_tensor(op, "found_inf", found_inf, device, 1, torch.float32)
    check_aux_tensor(op, "grad_norm", grad_norm, device, 1, torch.float32)
    _check(grad_norm is None or max_grad_norm > 0, op, "max_grad_norm must be positive, got ", max_grad_norm)


def check_l1_weight_decay(op: str, l1_weight_decay: Sequence[float], groups: int) -> None:
    """l1_weight_decay: one value per group, or empty (none); each >= 0 (csrc/optim_host.cpp's check)."""
    if len(l1_weight_decay) == 0:
        return
    _check(len(l1_weight_decay) == groups, op, "l1_weight_decay has ", len(l1_weight_decay), " values for ", groups,
           " groups; one value per group (or none)")
    for k, l1 in enumerate(l1_weight_decay):
        _check(l1 >= 0.0, op, "Invalid l1_weight_decay value: ", l1, " (group ", k, ")")


def group_l1(l1_weight_decay: Sequence[float], k: int) -> float:
    """Group k's l1_weight_decay (0 when the list is empty)."""
    return float(l1_weight_decay[k]) if len(l1_weight_decay) else 0.0


def check_precision(op: str, params: Sequence[torch.Tensor], master_params, param_remainders,
                    stochastic_seed: Optional[int]) -> None:
    """The precision policy's arguments of a step op (csrc/include/pyoptim/precision.h): at most one of
    master_params (float32, for 16-bit params), param_remainders (int16, for bfloat16 params) and
    stochastic_seed (for bfloat16 params), each list one entry per param of its shape and device."""
    given = [name for name, x in (("master_params", master_params), ("param_remainders", param_remainders),
                                  ("stochastic_seed", stochastic_seed)) if x is not None]
    _check(len(given) <= 1, op, "at most one of master_params, param_remainders and stochastic_seed, got ",
           " and ".join(given))
    if not given or len(params) == 0:
        return
    dtype = params[0].dtype
    wanted = {"master_params": ((torch.float16, torch.bfloat16), torch.float32),
              "param_remainders": ((torch.bfloat16,), torch.int16),
              "stochastic_seed": ((torch.bfloat16,), None)}[given[0]]
    _check(dtype in wanted[0], op, given[0], " needs params of dtype ", " or ".join(map(_dtype_name, wanted[0])),
           ", got ", _dtype_name(dtype))
    lst = master_params if master_params is not None else param_remainders
    if lst is None:
        return
    _check(len(lst) == len(params), op, given[0], " has ", len(lst), " entries but params has ", len(params))
    for i, (t, p) in enumerate(zip(lst, params)):
        _check(t is not None and t.layout == torch.strided and t.dtype == wanted[1], op, given[0], "[", i,
               "] must be a strided ", _dtype_name(wanted[1]), " tensor")
        _check(t.device == p.device, op, given[0], "[", i, "] is on ", t.device, " but params[", i, "] is on ",
               p.device)
        _check(t.shape == p.shape, op, given[0], "[", i, "] has shape ", list(t.shape), " but params[", i,
               "] has shape ", list(p.shape))
        _check(not _shares_memory(t, p), op, given[0], "[", i, "] shares memory with params[", i, "]")


def check_adam_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, lr, beta1, beta2,
                    weight_decay, eps, group_sizes, amsgrad, l1_weight_decay=(), lr_tensor=None, grad_scale=None,
                    found_inf=None, grad_norm=None, max_grad_norm=0.0, master_params=None, param_remainders=None,
                    stochastic_seed=None, device_type=None, **_unused) -> None:
    """Raise RuntimeError, as the C++ backends do, on any bad argument of adam_step_."""
    op = "adam_step_"
    check_tensor_lists(op, "params", params, {"grads": grads}, device_type,
                       state={"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs, "max_exp_avg_sqs": max_exp_avg_sqs})
    check_precision(op, params, master_params, param_remainders, stochastic_seed)
    n = len(params)
    _check(len(grads) == n and len(exp_avgs) == n and len(exp_avg_sqs) == n and len(state_steps) == n, op,
           "params, grads, exp_avgs, exp_avg_sqs and state_steps must have the same length, got ", n, ", ",
           len(grads), ", ", len(exp_avgs), ", ", len(exp_avg_sqs), ", ", len(state_steps))
    _check(not amsgrad or len(max_exp_avg_sqs) == n, op, "amsgrad needs one max_exp_avg_sqs entry per param, got ",
           len(max_exp_avg_sqs), " for ", n, " params")
    check_group_lists(op, group_sizes, {"lr": lr, "beta1": beta1, "beta2": beta2, "weight_decay": weight_decay,
                                        "eps": eps}, n)
    for k in range(len(group_sizes)):
        _check(lr[k] >= 0.0, op, "Invalid learning rate: ", lr[k], " (group ", k, ")")
        _check(eps[k] >= 0.0, op, "Invalid epsilon value: ", eps[k], " (group ", k, ")")
        _check(0.0 <= beta1[k] < 1.0, op, "Invalid beta parameter at index 0: ", beta1[k], " (group ", k, ")")
        _check(0.0 <= beta2[k] < 1.0, op, "Invalid beta parameter at index 1: ", beta2[k], " (group ", k, ")")
        _check(weight_decay[k] >= 0.0, op, "Invalid weight_decay value: ", weight_decay[k], " (group ", k, ")")
    check_l1_weight_decay(op, l1_weight_decay, len(group_sizes))
    for i, s in enumerate(state_steps):
        _check(s is not None and s.numel() == 1 and s.dtype == torch.float32, op, "state_steps[", i,
               "] must be a float32 tensor of one element")
        _check(s.device == params[i].device, op, "state_steps[", i, "] is on ", s.device, " but params[", i,
               "] is on ", params[i].device)
    check_step_aux(op, params, len(group_sizes), lr_tensor, grad_scale, found_inf, grad_norm, max_grad_norm)


def _check_momentum_buffers(op: str, momentum: Sequence[float], k: int, buffers, n: int) -> None:
    # A group with momentum needs the momentum buffers (sgd_step_, rmsprop_step_). With no params there is nothing
    # to move: the step plan checks the hyperparameters of its calls with empty lists (csrc/optim_host.cpp's).
    _check(n == 0 or len(buffers) > 0 or momentum[k] == 0.0, op, "group ", k, " has momentum ", momentum[k],
           " but no momentum_buffers were given")


def check_sgd_args(params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay, group_sizes, nesterov,
                   l1_weight_decay=(), lr_tensor=None, grad_scale=None, found_inf=None, grad_norm=None,
                   max_grad_norm=0.0, master_params=None, param_remainders=None, stochastic_seed=None,
                   state_steps=None, device_type=None, **_unused) -> None:
    """Raise RuntimeError, as the C++ backends do, on any bad argument of sgd_step_."""
    op = "sgd_step_"
    check_tensor_lists(op, "params", params, {"grads": grads}, device_type,
                       state={"momentum_buffers": momentum_buffers})
    check_precision(op, params, master_params, param_remainders, stochastic_seed)
    n = len(params)
    _check(len(grads) == n, op, "params and grads must have the same length, got ", n, " and ", len(grads))
    _check_policy_steps(op, stochastic_seed, state_steps, params)
    check_group_lists(op, group_sizes, {"lr": lr, "momentum": momentum, "dampening": dampening,
                                        "weight_decay": weight_decay}, n)
    for k in range(len(group_sizes)):
        _check(lr[k] >= 0.0, op, "Invalid learning rate: ", lr[k], " (group ", k, ")")
        _check(momentum[k] >= 0.0, op, "Invalid momentum value: ", momentum[k], " (group ", k, ")")
        _check(weight_decay[k] >= 0.0, op, "Invalid weight_decay value: ", weight_decay[k], " (group ", k, ")")
        _check_momentum_buffers(op, momentum, k, momentum_buffers, n)
        _check(not nesterov or (momentum[k] > 0.0 and dampening[k] == 0.0), op,
               "Nesterov momentum requires a momentum and zero dampening (group ", k, ")")
    check_l1_weight_decay(op, l1_weight_decay, len(group_sizes))
    check_step_aux(op, params, len(group_sizes), lr_tensor, grad_scale, found_inf, grad_norm, max_grad_norm)


def _check_betas(op: str, beta1: Sequence[float], beta2: Sequence[float], k: int) -> None:
    # torch.optim's beta check: 0 <= beta < 1.
    _check(0.0 <= beta1[k] < 1.0, op, "Invalid beta parameter at index 0: ", beta1[k], " (group ", k, ")")
    _check(0.0 <= beta2[k] < 1.0, op, "Invalid beta parameter at index 1: ", beta2[k], " (group ", k, ")")


def _check_state_steps(op: str, state_steps, params) -> None:
    for i, s in enumerate(state_steps):
        _check(s is not None and s.numel() == 1 and s.dtype == torch.float32, op, "state_steps[", i,
               "] must be a float32 tensor of one element")
        _check(s.device == params[i].device, op, "state_steps[", i, "] is on ", s.device, " but params[", i,
               "] is on ", params[i].device)


def _check_policy_steps(op: str, stochastic_seed, state_steps, params) -> None:
    # The optional step counters of an op that keeps no step (sgd_step_, lion_step_): stochastic rounding's random
    # bits hash them, so stochastic_seed needs them (csrc/optim_host.cpp's check_policy_steps).
    _check(stochastic_seed is None or state_steps is not None, op,
           "stochastic_seed needs state_steps (the step counters its random bits hash)")
    if state_steps is not None:
        _check(len(state_steps) == len(params), op, "state_steps has ", len(state_steps), " entries but params has ",
               len(params))
        _check_state_steps(op, state_steps, params)


def check_lion_args(params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay, group_sizes, l1_weight_decay=(),
                    lr_tensor=None, grad_scale=None, found_inf=None, grad_norm=None, max_grad_norm=0.0,
                    master_params=None, param_remainders=None, stochastic_seed=None, state_steps=None,
                    device_type=None, **_unused) -> None:
    """Raise RuntimeError, as the C++ backends do, on any bad argument of lion_step_."""
    op = "lion_step_"
    check_tensor_lists(op, "params", params, {"grads": grads}, device_type, state={"exp_avgs": exp_avgs})
    check_precision(op, params, master_params, param_remainders, stochastic_seed)
    n = len(params)
    _check(len(grads) == n and len(exp_avgs) == n, op, "params, grads and exp_avgs must have the same length, got ",
           n, ", ", len(grads), ", ", len(exp_avgs))
    _check_policy_steps(op, stochastic_seed, state_steps, params)
    check_group_lists(op, group_sizes, {"lr": lr, "beta1": beta1, "beta2": beta2, "weight_decay": weight_decay}, n)
    for k in range(len(group_sizes)):
        _check(lr[k] >= 0.0, op, "Invalid learning rate: ", lr[k], " (group ", k, ")")
        _check_betas(op, beta1, beta2, k)
        _check(weight_decay[k] >= 0.0, op, "Invalid weight_decay value: ", weight_decay[k], " (group ", k, ")")
    check_l1_weight_decay(op, l1_weight_decay, len(group_sizes))
    check_step_aux(op, params, len(group_sizes), lr_tensor, grad_scale, found_inf, grad_norm, max_grad_norm)


def check_lamb_args(params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, beta1, beta2, weight_decay, eps,
                    group_sizes, l1_weight_decay=(), lr_tensor=None, grad_scale=None, found_inf=None, grad_norm=None,
                    max_grad_norm=0.0, master_params=None, param_remainders=None, stochastic_seed=None,
                    device_type=None, op="lamb_step_", **_unused) -> None:
    """Raise RuntimeError, as the C++ backends do, on any bad argument of lamb_step_ (or of lamb_moments_ and
    lamb_apply_, `op`, which take the same arguments)."""
    check_tensor_lists(op, "params", params, {"grads": grads}, device_type,
                       state={"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs})
    check_precision(op, params, master_params, param_remainders, stochastic_seed)
    n = len(params)
    _check(len(grads) == n and len(exp_avgs) == n and len(exp_avg_sqs) == n and len(state_steps) == n, op,
           "params, grads, exp_avgs, exp_avg_sqs and state_steps must have the same length, got ", n, ", ",
           len(grads), ", ", len(exp_avgs), ", ", len(exp_avg_sqs), ", ", len(state_steps))
    check_group_lists(op, group_sizes, {"lr": lr, "beta1": beta1, "beta2": beta2, "weight_decay": weight_decay,
                                        "eps": eps}, n)
    for k in range(len(group_sizes)):
        _check(lr[k] >= 0.0, op, "Invalid learning rate: ", lr[k], " (group ", k, ")")
        _check(eps[k] >= 0.0, op, "Invalid epsilon value: ", eps[k], " (group ", k, ")")
        _check_betas(op, beta1, beta2, k)
        _check(weight_decay[k] >= 0.0, op, "Invalid weight_decay value: ", weight_decay[k], " (group ", k, ")")
    check_l1_weight_decay(op, l1_weight_decay, len(group_sizes))
    _check_state_steps(op, state_steps, params)
    check_step_aux(op, params, len(group_sizes), lr_tensor, grad_scale, found_inf, grad_norm, max_grad_norm)


def check_lamb_norms(op: str, norms, params) -> None:
    """lamb_apply_'s norms: float64 [2, n] on the params' device (csrc/optim_host.cpp's check_lamb_norms)."""
    n = len(params)
    _check(isinstance(norms, torch.Tensor) and norms.dtype == torch.float64 and norms.dim() == 2
           and norms.shape[0] == 2 and norms.shape[1] == n, op, "norms must be a float64 tensor of shape [2, ", n,
           "] (lamb_moments_'s), got ", list(norms.shape) if isinstance(norms, torch.Tensor) else norms)
    if n:
        _check(norms.device == params[0].device, op, "norms is on ", norms.device, ", expected ", params[0].device)


def _check_not_negative(op: str, what: str, values: Sequence[float], k: int) -> None:
    # torch.optim's check of a hyperparameter that must not be negative, with its message (csrc/optim_host.cpp's).
    _check(values[k] >= 0.0, op, "Invalid ", what, ": ", values[k], " (group ", k, ")")


def check_adagrad_args(params, grads, state_sums, state_steps, *, lr, lr_decay, weight_decay, eps, group_sizes,
                       l1_weight_decay=(), lr_tensor=None, grad_scale=None, found_inf=None, grad_norm=None,
                       max_grad_norm=0.0, master_params=None, param_remainders=None, stochastic_seed=None,
                       device_type=None, **_unused) -> None:
    """Raise RuntimeError, as the C++ backends do, on any bad argument of adagrad_step_."""
    op = "adagrad_step_"
    check_tensor_lists(op, "params", params, {"grads": grads}, device_type, state={"state_sums": state_sums})
    check_precision(op, params, master_params, param_remainders, stochastic_seed)
    n = len(params)
    _check(len(grads) == n and len(state_sums) == n and len(state_steps) == n, op,
           "params, grads, state_sums and state_steps must have the same length, got ", n, ", ", len(grads), ", ",
           len(state_sums), ", ", len(state_steps))
    check_group_lists(op, group_sizes, {"lr": lr, "lr_decay": lr_decay, "weight_decay": weight_decay, "eps": eps}, n)
    for k in range(len(group_sizes)):
        # torch.optim.Adagrad's checks, in its order.
        _check_not_negative(op, "learning rate", lr, k)
        _check_not_negative(op, "lr_decay value", lr_decay, k)
        _check_not_negative(op, "weight_decay value", weight_decay, k)
        _check_not_negative(op, "epsilon value", eps, k)
    check_l1_weight_decay(op, l1_weight_decay, len(group_sizes))
    _check_state_steps(op, state_steps, params)
    check_step_aux(op, params, len(group_sizes), lr_tensor, grad_scale, found_inf, grad_norm, max_grad_norm)


def check_rmsprop_args(params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps, *, lr, alpha, eps,
                       weight_decay, momentum, group_sizes, centered, l1_weight_decay=(), lr_tensor=None,
                       grad_scale=None, found_inf=None, grad_norm=None, max_grad_norm=0.0, master_params=None,
                       param_remainders=None, stochastic_seed=None, device_type=None, **_unused) -> None:
    """Raise RuntimeError, as the C++ backends do, on any bad argument of rmsprop_step_."""
    op = "rmsprop_step_"
    check_tensor_lists(op, "params", params, {"grads": grads}, device_type,
                       state={"square_avgs": square_avgs, "grad_avgs": grad_avgs, "momentum_buffers": momentum_buffers})
    check_precision(op, params, master_params, param_remainders, stochastic_seed)
    n = len(params)
    _check(len(grads) == n and len(square_avgs) == n and len(state_steps) == n, op,
           "params, grads, square_avgs and state_steps must have the same length, got ", n, ", ", len(grads), ", ",
           len(square_avgs), ", ", len(state_steps))
    _check(not centered or len(grad_avgs) == n, op, "centered needs one grad_avgs entry per param, got ",
           len(grad_avgs), " for ", n, " params")
    check_group_lists(op, group_sizes, {"lr": lr, "alpha": alpha, "eps": eps, "weight_decay": weight_decay,
                                        "momentum": momentum}, n)
    for k in range(len(group_sizes)):
        # torch.optim.RMSprop's checks, in its order.
        _check_not_negative(op, "learning rate", lr, k)
        _check_not_negative(op, "epsilon value", eps, k)
        _check_not_negative(op, "momentum value", momentum, k)
        _check_not_negative(op, "weight_decay value", weight_decay, k)
        _check_not_negative(op, "alpha value", alpha, k)
        _check_momentum_buffers(op, momentum, k, momentum_buffers, n)
    check_l1_weight_decay(op, l1_weight_decay, len(group_sizes))
    _check_state_steps(op, state_steps, params)
    check_step_aux(op, params, len(group_sizes), lr_tensor, grad_scale, found_inf, grad_norm, max_grad_norm)


def check_norm_args(tensors, norm_type, device_type=None) -> None:
    """Raise RuntimeError, as the C++ backends do, on any bad argument of multi_tensor_norm."""
    op = "multi_tensor_norm"
    check_tensor_lists(op, "tensors", tensors, {}, device_type)
    _check(norm_type > 0.0, op, "norm_type must be positive, got ", norm_type)


def check_clip_scale_args(tensors, total_norm, max_norm, device_type=None) -> None:
    """Raise RuntimeError, as the C++ backends do, on any bad argument of clip_scale_."""
    op = "clip_scale_"
    check_tensor_lists(op, "tensors", tensors, {}, device_type)
    _check(max_norm >= 0.0, op, "max_norm must be non-negative, got ", max_norm)
    if len(tensors):
        check_aux_tensor(op, "total_norm", total_norm, tensors[0].device, 1, torch.float32)


# -- the norm ops (csrc/norm_host.cpp) -----------------------------------------

_NORM_DTYPES = FLOAT_DTYPES


def _strided(t: torch.Tensor) -> bool:
    """t.layout == torch.strided; taken as given while torch.compile traces (dynamo's strict mode forbids reading
    .layout in an autograd.Function's backward, and it traces strided tensors only)."""
    return torch.compiler.is_compiling() or t.layout == torch.strided


def _torch_check(cond: bool, *msg: object) -> None:
    # torch's own messages carry no op prefix.
    if not cond:
        raise RuntimeError("".join(str(m) for m in msg))


def norm_stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The saved statistics' dtype: float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rms_norm_eps(eps: Optional[float], dtype: torch.dtype) -> float:
    """RMSNorm's eps: as given, else the epsilon of the math dtype, as torch's rms_norm defaults it.

    float32's for float16/bfloat16/float32 input, float64's for float64: aten
    takes `std::numeric_limits<opmath_t>::epsilon()` (the docs' finfo(input.dtype)
    would be bfloat16's 2^-7, which changes every output of a small-norm row).
    """
    if eps is not None:
        return float(eps)
    return float(torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps)


def _check_norm_param(op: str, name: str, t: Optional[torch.Tensor], input: torch.Tensor,
                      normalized_shape: list[int]) -> None:
    if t is None:
        return
    _torch_check(list(t.shape) == normalized_shape, "Expected ", name,
                 " to be of same shape as normalized_shape, but got ", name, " of shape ", list(t.shape),
                 " and normalized_shape = ", normalized_shape)
    _check(t.device == input.device, op, name, " is on ", t.device, " but input is on ", input.device)
    low = input.dtype in (torch.float16, torch.bfloat16)
    _check(t.dtype == input.dtype or (low and t.dtype == torch.float32), op, name, " has dtype ",
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
        _check(input.device.type == device_type, op, "input is on ", input.device, ", expected a ",
                    device_type, " tensor")
    _check(_strided(input), op, "input is not a strided tensor")
    _check(input.dtype in _NORM_DTYPES, op, "input has dtype ", _dtype_name(input.dtype),
                "; supported are float32, float64, float16 and bfloat16")
    if weight is not None and bias is not None:
        _check(weight.dtype == bias.dtype, op, "weight has dtype ", _dtype_name(weight.dtype),
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
    check_norm_grad_out(op, grad_out, input)
    sd = norm_stat_dtype(input.dtype)
    for name, t in (("mean", None if rms else mean), ("rstd", rstd)):
        if t is None:
            continue
        _check(t.numel() == m, op, name, " has ", t.numel(), " elements, expected one per row (", m, ")")
        _check(t.dtype == sd, op, name, " has dtype ", _dtype_name(t.dtype), ", expected ", _dtype_name(sd))
        _check(t.device == input.device, op, name, " is on ", t.device, " but input is on ", input.device)
    return m, n, stat_shape


# -- the BatchNorm ops (csrc/batch_norm_host.cpp) --------------------------------
#
# Each op runs, in this order (the C++ launchers the same):
#   batch_norm_fwd:            fwd args (running statistics required in eval)
#   batch_norm_bwd:            fwd args (input, weight), grad_out, save_mean, save_invstd
#   batch_norm_stats:          fwd args (input)
#   batch_norm_elemt:          fwd args (input, weight, bias), mean, invstd
#   batch_norm_backward_reduce: fwd args (input), grad_out, mean
#   batch_norm_backward_elemt: fwd args (input, weight), grad_out, mean, invstd, mean_dy, mean_dy_xmu


def _check_batch_norm_channel_param(op: str, name: str, t: Optional[torch.Tensor], input: torch.Tensor) -> None:
    """A per-channel parameter or running statistic: C elements, input's device, input's dtype or float32."""
    if t is None:
        return
    c = input.shape[1]
    # torch's own message (aten/src/ATen/native/Normalization.cpp).
    _torch_check(t.numel() == c, name, " should contain ", c, " elements not ", t.numel())
    _check(t.device == input.device, op, name, " is on ", t.device, " but input is on ", input.device)
    low = input.dtype in (torch.float16, torch.bfloat16)
    _check(t.dtype == input.dtype or (low and t.dtype == torch.float32), op, name, " has dtype ",
           _dtype_name(t.dtype), " but input has dtype ", _dtype_name(input.dtype), "; expected ",
           _dtype_name(input.dtype), " or Float" if low else "")


def check_batch_norm_fwd_args(op: str, input: torch.Tensor, weight: Optional[torch.Tensor],
                              bias: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
                              running_var: Optional[torch.Tensor], training: bool, require_running: bool,
                              device_type: Optional[str] = None) -> tuple[int, int, int]:
    """Raise RuntimeError as csrc/batch_norm_host.cpp's check_batch_norm_fwd_args does; return (N, C, S)."""
    _check(input.dim() >= 2, op, "expected input of shape (N, C, *), with at least 2 dims, but got input of size ",
           list(input.shape))
    if device_type is not None:
        _check(input.device.type == device_type, op, "input is on ", input.device, ", expected a ", device_type,
               " tensor")
    _check(_strided(input), op, "input is not a strided tensor")
    _check(input.dtype in _NORM_DTYPES, op, "input has dtype ", _dtype_name(input.dtype),
           "; supported are float32, float64, float16 and bfloat16")
    # torch checks the running statistics before weight and bias; so do we, so the first message matches.
    _check_batch_norm_channel_param(op, "running_mean", running_mean, input)
    _check_batch_norm_channel_param(op, "running_var", running_var, input)
    _check_batch_norm_channel_param(op, "weight", weight, input)
    _check_batch_norm_channel_param(op, "bias", bias, input)
    if require_running and not training:
        # torch's own messages.
        _torch_check(running_mean is not None, "running_mean must be defined in evaluation mode")
        _torch_check(running_var is not None, "running_var must be defined in evaluation mode")
    if (running_mean is None) != (running_var is None):
        # torch's own message and type (TORCH_CHECK_VALUE in aten's batch_norm).
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    s = 1
    for d in input.shape[2:]:
        s *= d
    return input.shape[0], input.shape[1], s


def check_batch_norm_stat(op: str, name: str, stat: torch.Tensor, input: torch.Tensor) -> None:
    """A per-channel statistic (save_mean, invstd, mean_dy, ...): C elements of the stat dtype on input's device."""
    c = input.shape[1] if input.dim() >= 2 else 0
    _check(stat.numel() == c, op, name, " has ", stat.numel(), " elements, expected one per channel (", c, ")")
    sd = norm_stat_dtype(input.dtype)
    _check(stat.dtype == sd, op, name, " has dtype ", _dtype_name(stat.dtype), ", expected ", _dtype_name(sd))
    _check(stat.device == input.device, op, name, " is on ", stat.device, " but input is on ", input.device)


def check_norm_grad_out(op: str, grad_out: torch.Tensor, input: torch.Tensor) -> None:
    """grad_out against input: same shape, dtype and device (every norm's backward; csrc/norm_host.cpp)."""
    _check(grad_out.shape == input.shape, op, "grad_out has shape ", list(grad_out.shape), " but input has shape ",
           list(input.shape))
    _check(grad_out.dtype == input.dtype, op, "grad_out has dtype ", _dtype_name(grad_out.dtype),
           " but input has dtype ", _dtype_name(input.dtype))
    _check(grad_out.device == input.device, op, "grad_out is on ", grad_out.device, " but input is on ",
           input.device)


def check_batch_norm_bwd_args(grad_out: torch.Tensor, input: torch.Tensor, weight: Optional[torch.Tensor],
                              save_mean: torch.Tensor, save_invstd: torch.Tensor, training: bool,
                              device_type: Optional[str] = None) -> tuple[int, int, int]:
    """Every check of batch_norm_bwd; return (N, C, S)."""
    op = "batch_norm_bwd"
    dims = check_batch_norm_fwd_args(op, input, weight, None, None, None, training, False, device_type)
    check_norm_grad_out(op, grad_out, input)
    check_batch_norm_stat(op, "save_mean", save_mean, input)
    check_batch_norm_stat(op, "save_invstd", save_invstd, input)
    return dims


def check_batch_norm_stats_args(input: torch.Tensor, device_type: Optional[str] = None) -> tuple[int, int, int]:
    """Every check of batch_norm_stats; return (N, C, S)."""
    return check_batch_norm_fwd_args("batch_norm_stats", input, None, None, None, None, True, False, device_type)


def check_batch_norm_elemt_args(input: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                                mean: torch.Tensor, invstd: torch.Tensor,
                                device_type: Optional[str] = None) -> tuple[int, int, int]:
    """Every check of batch_norm_elemt; return (N, C, S)."""
    op = "batch_norm_elemt"
    dims = check_batch_norm_fwd_args(op, input, weight, bias, None, None, True, False, device_type)
    check_batch_norm_stat(op, "mean", mean, input)
    check_batch_norm_stat(op, "invstd", invstd, input)
    return dims


def check_batch_norm_backward_reduce_args(grad_out: torch.Tensor, input: torch.Tensor, mean: torch.Tensor,
                                          device_type: Optional[str] = None) -> tuple[int, int, int]:
    """Every check of batch_norm_backward_reduce; return (N, C, S)."""
    op = "batch_norm_backward_reduce"
    dims = check_batch_norm_fwd_args(op, input, None, None, None, None, True, False, device_type)
    check_norm_grad_out(op, grad_out, input)
    check_batch_norm_stat(op, "mean", mean, input)
    return dims


def check_batch_norm_backward_elemt_args(grad_out: torch.Tensor, input: torch.Tensor, mean: torch.Tensor,
                                         invstd: torch.Tensor, weight: Optional[torch.Tensor],
                                         mean_dy: torch.Tensor, mean_dy_xmu: torch.Tensor,
                                         device_type: Optional[str] = None) -> tuple[int, int, int]:
    """Every check of batch_norm_backward_elemt; return (N, C, S)."""
    op = "batch_norm_backward_elemt"
    dims = check_batch_norm_fwd_args(op, input, weight, None, None, None, True, False, device_type)
    check_norm_grad_out(op, grad_out, input)
    check_batch_norm_stat(op, "mean", mean, input)
    check_batch_norm_stat(op, "invstd", invstd, input)
    check_batch_norm_stat(op, "mean_dy", mean_dy, input)
    check_batch_norm_stat(op, "mean_dy_xmu", mean_dy_xmu, input)
    return dims


def batch_norm_is_channels_last(t: torch.Tensor) -> bool:
    """True when `t` (at least 3-d) is dense with dim 1 innermost, as csrc/batch_norm_host.cpp reads it."""
    return t.dim() >= 3 and t.permute(0, *range(2, t.dim()), 1).is_contiguous()


def batch_norm_layout(input: torch.Tensor) -> torch.Tensor:
    """The input in a layout the BatchNorm kernels read: itself (NCHW-contiguous or channels-last), else contiguous.

    Outputs shaped like the input are torch.empty_like(that tensor).
    """
    if input.is_contiguous() or batch_norm_is_channels_last(input):
        return input
    return input.contiguous()
