"""Drop-ins for torch.nn.utils' gradient clipping."""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Optional, Union

import torch
from torch import Tensor

from pyoptim import functional

__all__ = ["clip_grad_norm_", "clip_grad_value_"]

_TensorOrTensors = Union[Tensor, Iterable[Tensor]]


def _grads_by_device_and_dtype(parameters: _TensorOrTensors) -> dict[tuple, list[Tensor]]:
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    groups: dict[tuple, list[Tensor]] = defaultdict(list)
    for p in parameters:
        g = p.grad
        if g is None:
            continue
        if g.is_complex():
            g = torch.view_as_real(g)
        groups[(g.device, g.dtype)].append(g)
    return groups


@torch.no_grad()
def clip_grad_norm_(
    parameters: _TensorOrTensors,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: Optional[bool] = None,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """torch.nn.utils.clip_grad_norm_: scale the grads so their total norm is at most max_norm; return the total norm.

    One pass computes the norms (accumulated in fp32/fp64, so fp16/bf16 grads
    do not overflow and large tensors lose no accuracy), one pass scales, and
    the host never waits for the device unless error_if_nonfinite asks it to.
    The total norm is returned in float32. `foreach` is accepted and ignored.
    """
    norm_type = float(norm_type)
    max_norm = float(max_norm)
    groups = _grads_by_device_and_dtype(parameters)
    if not groups:
        return torch.tensor(0.0)
    totals = [functional.multi_tensor_norm(grads, norm_type, backend=backend)[0] for grads in groups.values()]
    device0 = totals[0].device
    total = totals[0] if len(totals) == 1 else torch.linalg.vector_norm(
        torch.stack([t.to(device0) for t in totals]), norm_type)
    if error_if_nonfinite and bool(torch.logical_or(total.isnan(), total.isinf())):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it cannot be "
            "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`"
        )
    for (device, _), grads in groups.items():
        functional.clip_scale_(grads, total if total.device == device else total.to(device), max_norm,
                               backend=backend)
    return total


@torch.no_grad()
def clip_grad_value_(parameters: _TensorOrTensors, clip_value: float, foreach: Optional[bool] = None) -> None:
    """torch.nn.utils.clip_grad_value_: clamp every grad to [-clip_value, clip_value] in place."""
    clip_value = float(clip_value)
    for grads in _grads_by_device_and_dtype(parameters).values():
        torch._foreach_clamp_min_(grads, -clip_value)
        torch._foreach_clamp_max_(grads, clip_value)
