"""pyoptim.nn: drop-ins for torch.nn's norm layers (`torch.nn.LayerNorm` -> `pyoptim.nn.LayerNorm`) and
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

__all__ = ["LayerNorm", "RMSNorm", "functional", "replace_norms", "utils"]


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


def _ours(module: torch.nn.Module, backend: Optional[str]) -> Optional[torch.nn.Module]:
    """Our twin of a torch LayerNorm/RMSNorm holding the same Parameter objects, or None for any other module."""
    if type(module) is torch.nn.LayerNorm:
        new = LayerNorm(module.normalized_shape, eps=module.eps, elementwise_affine=module.elementwise_affine,
                        bias=module.bias is not None, device="meta", backend=backend)
    elif type(module) is torch.nn.RMSNorm:
        new = RMSNorm(module.normalized_shape, eps=module.eps, elementwise_affine=module.elementwise_affine,
                      device="meta", backend=backend)
    else:
        return None
    # The same Parameter objects (so an optimizer built before the swap still
    # updates them), hence the same device and dtype; hooks and mode too.
    for name, param in module._parameters.items():
        new._parameters[name] = param
    new.train(module.training)
    new._forward_pre_hooks.update(module._forward_pre_hooks)
    new._forward_hooks.update(module._forward_hooks)
    return new


def replace_norms(model: torch.nn.Module, *, backend: Optional[str] = None) -> torch.nn.Module:
    """Swap every torch.nn.LayerNorm/RMSNorm in `model` for pyoptim's, in place, keeping weights; return the model."""
    root = _ours(model, backend)
    if root is not None:
        return root  # the model is itself a norm: nothing holds it to swap in place
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            new = _ours(child, backend)
            if new is not None:
                setattr(parent, name, new)
    return model
