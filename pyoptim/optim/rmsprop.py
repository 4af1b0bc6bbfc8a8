"""RMSprop: a drop-in for torch.optim.RMSprop."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor

from pyoptim._validation import check_rmsprop_args
from pyoptim.optim._base import FusedOptimizer, check_hyperparameters

__all__ = ["RMSprop"]


class RMSprop(FusedOptimizer):
    """torch.optim.RMSprop's arguments, state and semantics, with each step one fused kernel call per (device, dtype).

    Per param, with g its grad (unscaled by GradScaler, clipped by
    `max_grad_norm`, negated by `maximize`) and its states `square_avg`,
    `grad_avg` (when centered) and `momentum_buffer` (when momentum > 0):

        g = g + l1_weight_decay * sign(p)                 (when l1_weight_decay > 0)
        g = g + weight_decay * p
        square_avg = alpha * square_avg + (1 - alpha) * g * g
        grad_avg = lerp(grad_avg, g, 1 - alpha)           (centered)
        avg = sqrt(square_avg - grad_avg^2) + eps         (centered; else sqrt(square_avg) + eps)
        buf = momentum * buf + g / avg; p = p - lr * buf  (momentum > 0; else p = p - lr * g / avg)

    and `step` counted, as torch keeps them. Extra keywords `backend`,
    `max_grad_norm`, `l1_weight_decay`, `flat` and the precision policy
    (`master_weights`, `state_dtype`: the dtype of square_avg, grad_avg and
    momentum_buffer, `stochastic_seed`, whose draws hash the step) as in
    pyoptim.optim.Adam; `foreach` and `capturable` are accepted and change
    nothing (the step count lives on the param's device, note [step placement]).
    """

    _op = "rmsprop_step_"
    _check_args = staticmethod(check_rmsprop_args)
    _lists = ("params", "grads", "square_avgs", "grad_avgs", "momentum_buffers", "state_steps")
    _supports_precision = True
    _torch_defaults = dict(momentum=0, centered=False, foreach=None, maximize=False, differentiable=False,
                           capturable=False, l1_weight_decay=0.0)

    def __init__(
        self,
        params: Any,
        lr: Union[float, Tensor] = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        capturable: bool = False,
        foreach: Optional[bool] = None,
        maximize: bool = False,
        differentiable: bool = False,
        *,
        max_grad_norm: Optional[float] = None,
        l1_weight_decay: float = 0.0,
        backend: Optional[str] = None,
        flat: bool = False,
        master_weights: Optional[str] = None,
        state_dtype: Optional[torch.dtype] = None,
        stochastic_seed: int = 0,
    ) -> None:
        # torch.optim.RMSprop's checks and messages, then ours.
        check_hyperparameters(lr, ("epsilon value", eps), ("momentum value", momentum),
                              ("weight_decay value", weight_decay), ("alpha value", alpha),
                              ("l1_weight_decay value", l1_weight_decay))
        defaults = dict(lr=lr, momentum=momentum, alpha=alpha, eps=eps, centered=centered, weight_decay=weight_decay,
                        capturable=capturable, foreach=foreach, maximize=maximize, differentiable=differentiable,
                        l1_weight_decay=l1_weight_decay)
        super().__init__(params, defaults, max_grad_norm, backend, flat, master_weights, state_dtype, stochastic_seed)

    def _sparse_message(self) -> str:
        return "RMSprop does not support sparse gradients"

    def _call_flags(self, group: dict[str, Any], fresh: bool) -> tuple:
        return bool(group["centered"]), group["momentum"] > 0, bool(group["maximize"])

    def _new_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        state = {
            "step": torch.zeros((), dtype=torch.float32, device=p.device),
            "square_avg": self._zeros(p, group),
        }
        if group["momentum"] > 0:
            state["momentum_buffer"] = self._zeros(p, group)
        if group["centered"]:
            state["grad_avg"] = self._zeros(p, group)
        return state

    def _state_keys(self, group: dict[str, Any]) -> tuple[tuple[str, str], ...]:
        keys = (("square_avgs", "square_avg"), ("state_steps", "step"))
        if group["centered"]:
            keys += (("grad_avgs", "grad_avg"),)
        if group["momentum"] > 0:
            keys += (("momentum_buffers", "momentum_buffer"),)
        return keys

    def _call_kwargs(self, flags: tuple, groups: list[dict[str, Any]]) -> dict[str, Any]:
        centered, _, maximize = flags
        return dict(
            alpha=[float(g["alpha"]) for g in groups],
            eps=[float(g["eps"]) for g in groups],
            weight_decay=[float(g["weight_decay"]) for g in groups],
            momentum=[float(g["momentum"]) for g in groups],
            l1_weight_decay=[float(g["l1_weight_decay"]) for g in groups],
            centered=centered,
            maximize=maximize,
        )
