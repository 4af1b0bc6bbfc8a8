"""Drop-ins for torch.nn.utils' gradient clipping."""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Optional, Union

import torch
from torch import Tensor

from pyoptim import _dtensor, functional

__all__ = ["clip_grad_norm_", "clip_grad_value_"]

_TensorOrTensors = Union[Tensor, Iterable[Tensor]]


def _grads_of(parameters: _TensorOrTensors) -> list[Tensor]:
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    return [p.grad for p in parameters if p.grad is not None]


def _one_group(grads: list[Tensor]) -> bool:
    """Whether `grads` are plain real tensors of one dtype and one device, which the groupings below take as they
    are: a scan that costs a tenth of grouping them one by one, which was most of a clip over thousands of small
    grads (the ops check devices and layouts themselves)."""
    g0 = grads[0]
    if type(g0) is not Tensor or g0.is_complex():
        return False
    dtype, index = g0.dtype, g0.get_device()
    return all(type(g) is Tensor and g.dtype is dtype and g.get_device() == index for g in grads)


def _by_device_and_dtype(grads: list[Tensor]) -> dict[tuple, list[Tensor]]:
    """The grads' local tensors (a DTensor's: note [DTensor by unwrapping]) by (device, dtype), complex as real."""
    if grads and _one_group(grads):
        return {(grads[0].device, grads[0].dtype): grads}
    groups: dict[tuple, list[Tensor]] = defaultdict(list)
    for g in grads:
        g = _dtensor.local(g)
        if g.is_complex():
            g = torch.view_as_real(g)
        groups[(g.device, g.dtype)].append(g)
    return groups


def _norm_inputs(grads: list[Tensor]) -> dict[tuple, list[Tensor]]:
    """The local tensors whose norms make the grads' global norm, by (device, dtype, norm class).

    A Partial grad's local parts do not add up to its norm: its norm is taken
    of it reduced to Replicate along those mesh dims (a temporary; the grad
    itself is scaled as it is, which scaling a sum allows).
    """
    if _one_group(grads):
        return {(grads[0].device, grads[0].dtype, None): grads}
    out: dict[tuple, list[Tensor]] = defaultdict(list)
    for g in grads:
        if _dtensor.is_dtensor(g) and any(pl.is_partial() for pl in g.placements):
            from torch.distributed.tensor import Replicate

            g = g.redistribute(g.device_mesh, [Replicate() if pl.is_partial() else pl for pl in g.placements])
        cls = _dtensor.norm_class(g)
        g = _dtensor.local(g)
        if g.is_complex():
            g = torch.view_as_real(g)
        out[(g.device, g.dtype, cls)].append(g)
    return out


def _total_norm(inputs: dict[tuple, list[Tensor]], norm_type: float, backend: Optional[str]) -> Tensor:
    """The norm_type-norm of all grads (float32, 0-d), global over DTensors' meshes, from their _norm_inputs."""
    totals: dict[object, list[Tensor]] = defaultdict(list)
    for (_, _, cls), members in inputs.items():
        totals[cls].append(functional.multi_tensor_norm(members, norm_type, backend=backend)[0])
    device0 = next(iter(totals.values()))[0].device

    def combined(parts: list[Tensor]) -> Tensor:
        return parts[0] if len(parts) == 1 else torch.linalg.vector_norm(
            torch.stack([t.to(device0) for t in parts]), norm_type)

    if list(totals) == [None]:
        return combined(totals[None])
    return _dtensor.global_norm({k: combined(v) for k, v in totals.items()}, norm_type)


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
    DTensor grads (FSDP2, tensor parallel) count with their global norm, their
    ranks' partial sums reduced in one all-reduce per mesh dimension, and the
    norm comes back as a Replicate DTensor on their mesh, as torch's does.
    """
    norm_type = float(norm_type)
    max_norm = float(max_norm)
    grads = _grads_of(parameters)
    if not grads:
        return torch.tensor(0.0)
    inputs = _norm_inputs(grads)
    total = _total_norm(inputs, norm_type, backend)
    if error_if_nonfinite and bool(torch.logical_or(total.isnan(), total.isinf())):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it cannot be "
            "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`"
        )
    if all(cls is None for _, _, cls in inputs):  # no DTensor: the norm's groups are the scale's
        groups = {(device, dtype): members for (device, dtype, _), members in inputs.items()}
    else:
        groups = _by_device_and_dtype(grads)
    for (device, _), group in groups.items():
        functional.clip_scale_(group, total if total.device == device else total.to(device), max_norm,
                               backend=backend)
    return _dtensor.replicated_like(total, grads)


@torch.no_grad()
def clip_grad_value_(parameters: _TensorOrTensors, clip_value: float, foreach: Optional[bool] = None) -> None:
    """torch.nn.utils.clip_grad_value_: clamp every grad to [-clip_value, clip_value] in place."""
    clip_value = float(clip_value)
    for grads in _by_device_and_dtype(_grads_of(parameters)).values():
        torch._foreach_clamp_min_(grads, -clip_value)
        torch._foreach_clamp_max_(grads, clip_value)
