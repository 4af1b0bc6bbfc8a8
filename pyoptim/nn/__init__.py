"""pyoptim.nn: drop-ins for torch.nn's norm layers (`torch.nn.LayerNorm` -> `pyoptim.nn.LayerNorm`,
`torch.nn.BatchNorm2d` -> `pyoptim.nn.BatchNorm2d`, ...) and
gradient clipping (`torch.nn.utils.clip_grad_norm_` -> `pyoptim.nn.utils.clip_grad_norm_`).

The modules subclass torch's, so parameters, defaults, state_dict() keys,
reset_parameters() and repr are torch's own, and weights load both ways;
only forward() runs our kernels.
"""

from __future__ import annotations

from typing import Optional

import torch

from pyoptim.functional import layer_norm, rms_norm
from pyoptim.nn import functional, utils
from pyoptim.nn.batch_norm import (BatchNorm1d, BatchNorm2d, BatchNorm3d, InstanceNorm1d, InstanceNorm2d,
                                   InstanceNorm3d, SyncBatchNorm)

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
           "LayerNorm", "RMSNorm", "SyncBatchNorm", "functional", "replace_norms", "utils"]


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm, computed by pyoptim's fused kernels (`backend` picks one; default: the fastest here)."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None, *, backend: Optional[str] = None) -> None:
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias, device=device,
                         dtype=dtype)
        self.backend = backend

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps, backend=self.backend)


class RMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm, computed by pyoptim's fused kernels (`backend` picks one; default: the fastest here)."""

    def __init__(self, normalized_shape, eps: Optional[float] = None, elementwise_affine: bool = True, device=None,
                 dtype=None, *, backend: Optional[str] = None) -> None:
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, device=device, dtype=dtype)
        self.backend = backend

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return rms_norm(input, self.normalized_shape, self.weight, self.eps, backend=self.backend)


# torch's BatchNorm/InstanceNorm classes and ours; the constructor arguments are
# the torch module's attributes of the same names.
_BATCH_NORMS = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
    torch.nn.InstanceNorm1d: InstanceNorm1d,
    torch.nn.InstanceNorm2d: InstanceNorm2d,
    torch.nn.InstanceNorm3d: InstanceNorm3d,
}


def _ours(module: torch.nn.Module, backend: Optional[str]) -> Optional[torch.nn.Module]:
    """Our twin of a torch norm module holding the same Parameter and buffer objects, or None for any other module."""
    kind = type(module)
    if kind is torch.nn.LayerNorm:
        new = LayerNorm(module.normalized_shape, eps=module.eps, elementwise_affine=module.elementwise_affine,
                        bias=module.bias is not None, device="meta", backend=backend)
    elif kind is torch.nn.RMSNorm:
        new = RMSNorm(module.normalized_shape, eps=module.eps, elementwise_affine=module.elementwise_affine,
                      device="meta", backend=backend)
    elif kind in _BATCH_NORMS:
        new = _BATCH_NORMS[kind](module.num_features, eps=module.eps, momentum=module.momentum, affine=module.affine,
                                 track_running_stats=module.track_running_stats, device="meta",
                                 bias=module.bias is not None or not module.affine, backend=backend)
    elif kind is torch.nn.SyncBatchNorm:
        new = SyncBatchNorm(module.num_features, eps=module.eps, momentum=module.momentum, affine=module.affine,
                            track_running_stats=module.track_running_stats, process_group=module.process_group,
                            device="meta", bias=module.bias is not None or not module.affine, backend=backend)
    else:
        return None
    # The same Parameter and buffer objects (so an optimizer built before the
    # swap still updates them, and running statistics carry on), hence the
    # same device and dtype; hooks and mode too.
    for name, param in module._parameters.items():
        new._parameters[name] = param
    for name, buf in module._buffers.items():
        new._buffers[name] = buf
    new._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    new.train(module.training)
    new._forward_pre_hooks.update(module._forward_pre_hooks)
    new._forward_hooks.update(module._forward_hooks)
    return new


def replace_norms(model: torch.nn.Module, *, backend: Optional[str] = None) -> torch.nn.Module:
    """Swap every torch LayerNorm, RMSNorm, BatchNorm*d, SyncBatchNorm, InstanceNorm*d in `model` for ours, in place.

    Weights, buffers, device, dtype and training mode are kept (the same
    tensors); returns the model (a new module when `model` is itself a norm).
    """
    root = _ours(model, backend)
    if root is not None:
        return root  # the model is itself a norm: nothing holds it to swap in place
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            new = _ours(child, backend)
            if new is not None:
                setattr(parent, name, new)
    return model
