"""The ops as functions, with backend selection, and their fake kernels.

`adam_step_` here is the public entry of the op; the optimizers call it. The
backend that serves a call is chosen by pyoptim._backends.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from pyoptim import _backends
from pyoptim._validation import check_adam_args

__all__ = ["adam_step_"]


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
    group_sizes: Optional[Sequence[int]] = None,
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    lr_tensor: Optional[torch.Tensor] = None,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
    grad_norm: Optional[torch.Tensor] = None,
    max_grad_norm: float = 0.0,
    backend: Optional[str] = None,
) -> None:
    """One Adam (or AdamW, with decoupled_weight_decay) step over many tensors of one device and dtype, in place.

    Per-group hyperparameters are lists with one value per group; tensors are
    ordered by group and `group_sizes` counts them (default: one group). With
    `grad_norm` (the L2 norm of the grads as passed), grads are clipped to
    `max_grad_norm` inside the kernel, as torch.nn.utils.clip_grad_norm_ would.
    """
    params, grads = list(params), list(grads)
    if group_sizes is None:
        group_sizes = [len(params)]
    if len(params) == 0:
        # No tensor to dispatch on: check the lists and do nothing.
        check_adam_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr=lr, beta1=beta1,
                        beta2=beta2, weight_decay=weight_decay, eps=eps, group_sizes=group_sizes, amsgrad=amsgrad,
                        lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf, grad_norm=grad_norm,
                        max_grad_norm=max_grad_norm)
        return
    impl = _backends.get("adam_step_", _backends.select("adam_step_", params[0].device, backend))
    impl(params, grads, list(exp_avgs), list(exp_avg_sqs), list(max_exp_avg_sqs), list(state_steps),
         lr=list(lr), beta1=list(beta1), beta2=list(beta2), weight_decay=list(weight_decay), eps=list(eps),
         group_sizes=list(group_sizes), amsgrad=amsgrad, maximize=maximize,
         decoupled_weight_decay=decoupled_weight_decay, lr_tensor=lr_tensor, grad_scale=grad_scale,
         found_inf=found_inf, grad_norm=grad_norm, max_grad_norm=max_grad_norm)


if _backends.EXTENSION_LOADED:

    @torch.library.register_fake("pyoptim::adam_step_")
    def _adam_step_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, lr, beta1, beta2,
                        weight_decay, eps, group_sizes, amsgrad, maximize, decoupled_weight_decay, lr_tensor=None,
                        grad_scale=None, found_inf=None, grad_norm=None, max_grad_norm=0.0):
        # In place and returns nothing: the fake kernel only checks.
        check_adam_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr=lr, beta1=beta1,
                        beta2=beta2, weight_decay=weight_decay, eps=eps, group_sizes=group_sizes, amsgrad=amsgrad,
                        lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf, grad_norm=grad_norm,
                        max_grad_norm=max_grad_norm)
        return None
