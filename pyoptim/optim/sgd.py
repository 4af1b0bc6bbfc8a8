"""SGD: a drop-in for torch.optim.SGD."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor
from torch.optim.sgd import sgd as _torch_sgd  # its functional step: note [sparse grads]

from pyoptim._validation import check_sgd_args
from pyoptim.optim._base import FusedOptimizer, effective_policy, state_dtype_of

__all__ = ["SGD"]


class SGD(FusedOptimizer):
    """torch.optim.SGD's arguments, state and semantics, with each step one fused kernel call per (device, dtype).

    Extra keywords `backend`, `max_grad_norm`, `l1_weight_decay`, `flat` and the precision policy
    (`master_weights`, `state_dtype`: the momentum buffers' dtype, `stochastic_seed`) as in pyoptim.optim.Adam.
    `foreach` and `fused` are accepted for compatibility and change nothing. Under master_weights="stochastic"
    a 16-bit param's state also holds a `step` counter (SGD keeps none otherwise), which the random bits hash.
    """

    _op = "sgd_step_"
    _check_args = staticmethod(check_sgd_args)
    _lists = ("params", "grads", "momentum_buffers")
    _supports_precision = True
    _torch_defaults = dict(momentum=0, dampening=0, weight_decay=0, nesterov=False, maximize=False, foreach=None,
                           differentiable=False, fused=None, l1_weight_decay=0.0)

    def __init__(
        self,
        params: Any,
        lr: Union[float, Tensor] = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: Union[float, Tensor] = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        max_grad_norm: Optional[float] = None,
        l1_weight_decay: float = 0.0,
        backend: Optional[str] = None,
        flat: bool = False,
        master_weights: Optional[str] = None,
        state_dtype: Optional[torch.dtype] = None,
        stochastic_seed: int = 0,
    ) -> None:
        # torch.optim.SGD's checks and messages.
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= l1_weight_decay:
            raise ValueError(f"Invalid l1_weight_decay value: {l1_weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        maximize=maximize, foreach=foreach, differentiable=differentiable, fused=fused,
                        l1_weight_decay=l1_weight_decay)
        super().__init__(params, defaults, max_grad_norm, backend, flat, master_weights, state_dtype, stochastic_seed)

    def _check_sparse(self, items: list[tuple[dict[str, Any], Tensor]]) -> None:
        super()._check_sparse(items)
        for group, _ in items:
            if group["weight_decay"] != 0:
                # torch's own error (grad.add(param) of a sparse grad), raised mid-step there, before any write here.
                raise RuntimeError("add(sparse, dense) is not supported. Use add(dense, sparse) instead.")

    def _step_sparse(self, items: list[tuple[dict[str, Any], Tensor]], grad_scale: Optional[Tensor],
                     found_inf: Optional[Tensor]) -> None:
        """note [sparse grads]: torch.optim.SGD's own update of the params with sparse grads."""
        grads = self._unscaled_sparse(items, grad_scale, found_inf)
        if grads is None:
            return
        for (group, p), g in zip(items, grads):
            state = self.state[p]
            buffers = [state.get("momentum_buffer")]
            _torch_sgd([p], [g], buffers, has_sparse_grad=True, foreach=False,
                                weight_decay=group["weight_decay"], momentum=group["momentum"], lr=group["lr"],
                                dampening=group["dampening"], nesterov=group["nesterov"],
                                maximize=group["maximize"])
            if group["momentum"] != 0:
                state["momentum_buffer"] = buffers[0]

    def _call_flags(self, group: dict[str, Any], fresh: bool) -> tuple:
        has_momentum = group["momentum"] != 0
        first_step = has_momentum and fresh
        return has_momentum, first_step, bool(group["nesterov"]), bool(group["maximize"])

    def _new_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        # torch keeps no state without momentum, and starts the buffer as a
        # copy of the first grad: the op writes it (is_first_step).
        state = {}
        if group["momentum"] != 0:
            state["momentum_buffer"] = torch.empty_like(p, dtype=state_dtype_of(group, p.dtype),
                                                        memory_format=torch.preserve_format)
        if effective_policy(group, p.dtype) == "stochastic":
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)  # note [stochastic key]
        return state

    def _policy_lists(self, policy: Optional[str]) -> tuple[tuple[str, str], ...]:
        # sgd_step_ keeps no step: stochastic rounding's counters ride along as state_steps.
        return (("step", "state_steps"),) if policy == "stochastic" else super()._policy_lists(policy)

    def _state_keys(self, group: dict[str, Any]) -> tuple[tuple[str, str], ...]:
        return (("momentum_buffers", "momentum_buffer"),) if group["momentum"] != 0 else ()

    def _call_kwargs(self, flags: tuple, groups: list[dict[str, Any]]) -> dict[str, Any]:
        has_momentum, first_step, nesterov, maximize = flags
        return dict(
            momentum=[float(g["momentum"]) for g in groups],
            dampening=[float(g["dampening"]) for g in groups],
            weight_decay=[float(g["weight_decay"]) for g in groups],
            l1_weight_decay=[float(g["l1_weight_decay"]) for g in groups],
            nesterov=nesterov,
            maximize=maximize,
            is_first_step=first_step,
        )
