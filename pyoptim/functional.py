"""The ops as functions, with backend selection, and their fake kernels.

Each function here is the public entry of one op (torch.ops.pyoptim.<name>);
the optimizers and clipping utilities call these. Which backend serves a call
is pyoptim._backends' decision.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from pyoptim import _backends
from pyoptim._validation import check_adam_args, check_clip_scale_args, check_norm_args, check_sgd_args

__all__ = ["adam_step_", "sgd_step_", "multi_tensor_norm", "clip_scale_"]


def _impl(op: str, tensors: Sequence[torch.Tensor], backend: Optional[str]):
    return _backends.get(op, _backends.select(op, tensors[0].device, backend))


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
    lists = [list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(max_exp_avg_sqs), list(state_steps)]
    kwargs = dict(lr=list(lr), beta1=list(beta1), beta2=list(beta2), weight_decay=list(weight_decay), eps=list(eps),
                  group_sizes=list(group_sizes if group_sizes is not None else [len(lists[0])]), amsgrad=amsgrad,
                  maximize=maximize, decoupled_weight_decay=decoupled_weight_decay, lr_tensor=lr_tensor,
                  grad_scale=grad_scale, found_inf=found_inf, grad_norm=grad_norm, max_grad_norm=max_grad_norm)
    if not lists[0]:
        check_adam_args(*lists, **kwargs)  # no tensor to dispatch on: check the lists and do nothing
        return
    _impl("adam_step_", lists[0], backend)(*lists, **kwargs)


def sgd_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor],
    *,
    lr: Sequence[float],
    momentum: Sequence[float],
    dampening: Sequence[float],
    weight_decay: Sequence[float],
    group_sizes: Optional[Sequence[int]] = None,
    nesterov: bool = False,
    maximize: bool = False,
    is_first_step: bool = False,
    lr_tensor: Optional[torch.Tensor] = None,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
    grad_norm: Optional[torch.Tensor] = None,
    max_grad_norm: float = 0.0,
    backend: Optional[str] = None,
) -> None:
    """One SGD step (momentum, dampening, Nesterov, weight decay) over many tensors of one device and dtype, in place.

    `momentum_buffers` is empty when no group has momentum; with
    `is_first_step` the buffers are overwritten with the grads, as torch's SGD
    starts them. Other arguments as in adam_step_.
    """
    lists = [list(params), list(grads), list(momentum_buffers)]
    kwargs = dict(lr=list(lr), momentum=list(momentum), dampening=list(dampening), weight_decay=list(weight_decay),
                  group_sizes=list(group_sizes if group_sizes is not None else [len(lists[0])]), nesterov=nesterov,
                  maximize=maximize, is_first_step=is_first_step, lr_tensor=lr_tensor, grad_scale=grad_scale,
                  found_inf=found_inf, grad_norm=grad_norm, max_grad_norm=max_grad_norm)
    if not lists[0]:
        check_sgd_args(*lists, **kwargs)
        return
    _impl("sgd_step_", lists[0], backend)(*lists, **kwargs)


def multi_tensor_norm(tensors: Sequence[torch.Tensor], norm_type: float = 2.0, *,
                      backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The p-norm of many tensors of one device and dtype, as (total, per-tensor norms), in float32, in one pass."""
    tensors = list(tensors)
    check_norm_args(tensors, float(norm_type))
    if not tensors:
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

    @torch.library.register_fake("pyoptim::multi_tensor_norm")
    def _multi_tensor_norm_fake(tensors, norm_type):
        check_norm_args(tensors, norm_type)
        t0 = tensors[0]
        return t0.new_empty((), dtype=torch.float32), t0.new_empty((len(tensors),), dtype=torch.float32)

    @torch.library.register_fake("pyoptim::clip_scale_")
    def _clip_scale_fake(tensors, total_norm, max_norm):
        check_clip_scale_args(tensors, total_norm, max_norm)
