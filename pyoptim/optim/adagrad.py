"""Adagrad: a drop-in for torch.optim.Adagrad."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor
from torch.optim.adagrad import adagrad as _torch_adagrad  # its functional step: note [sparse grads]

from pyoptim._validation import check_adagrad_args
from pyoptim.optim._base import FusedOptimizer, check_hyperparameters, state_dtype_of

__all__ = ["Adagrad"]


class Adagrad(FusedOptimizer):
    """torch.optim.Adagrad's arguments, state and semantics, with each step one fused kernel call per (device, dtype).

    Per param, with g its grad (unscaled by GradScaler, clipped by
    `max_grad_norm`, negated by `maximize`), t its advanced `step` and `sum`
    its state:

        g = g + l1_weight_decay * sign(p)          (when l1_weight_decay > 0)
        g = g + weight_decay * p
        sum = sum + g * g
        p = p - lr / (1 + (t - 1) * lr_decay) * g / (sqrt(sum) + eps)

    As torch's, the state (`step` and `sum`, full of initial_accumulator_value)
    is made at construction for the params of the groups given then, and at
    their first step for params added later, from the constructor's
    initial_accumulator_value in both cases (a group's own value is kept but
    not read, as in torch). Extra keywords `backend`, `max_grad_norm`,
    `l1_weight_decay`, `flat` and the precision policy (`master_weights`,
    `state_dtype`: the dtype of `sum`, which starts at
    initial_accumulator_value rounded to it, `stochastic_seed`, whose draws
    hash the step) as in pyoptim.optim.Adam; a policy's master or remainder
    is made at the param's first step, from the param as it is then.
    `foreach` and `fused` are accepted and change nothing. Sparse grads (an
    nn.Embedding(sparse=True)) are stepped as torch.optim.Adagrad steps them,
    by its own for-loop update, after the fused call for the dense ones.
    """

    _op = "adagrad_step_"
    _check_args = staticmethod(check_adagrad_args)
    _lists = ("params", "grads", "state_sums", "state_steps")
    _supports_precision = True
    _torch_defaults = dict(foreach=None, maximize=False, differentiable=False, fused=None, l1_weight_decay=0.0)

    def __init__(
        self,
        params: Any,
        lr: Union[float, Tensor] = 1e-2,
        lr_decay: float = 0,
        weight_decay: float = 0,
        initial_accumulator_value: float = 0,
        eps: float = 1e-10,
        foreach: Optional[bool] = None,
        *,
        maximize: bool = False,
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
        # torch.optim.Adagrad's checks and messages, then ours.
        check_hyperparameters(lr, ("lr_decay value", lr_decay), ("weight_decay value", weight_decay),
                              ("initial_accumulator_value value", initial_accumulator_value), ("epsilon value", eps),
                              ("l1_weight_decay value", l1_weight_decay))
        defaults = dict(lr=lr, lr_decay=lr_decay, eps=eps, weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value, foreach=foreach, maximize=maximize,
                        differentiable=differentiable, fused=fused, l1_weight_decay=l1_weight_decay)
        super().__init__(params, defaults, max_grad_norm, backend, flat, master_weights, state_dtype, stochastic_seed)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p] = self._new_state(p, group)
                unit = self._flat_units.get(id(p))
                if unit is not None:
                    unit.rehome(p, state)

    def share_memory(self) -> None:
        """Calls tensor.share_memory_() on the state sum tensors (torch.optim.Adagrad's method)."""
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["sum"].share_memory_()

    def _check_sparse(self, items: list[tuple[dict[str, Any], Tensor]]) -> None:
        super()._check_sparse(items)
        for group, _ in items:
            if group["weight_decay"] != 0:
                raise RuntimeError("weight_decay option is not compatible with sparse gradients")  # torch's

    def _step_sparse(self, items: list[tuple[dict[str, Any], Tensor]], grad_scale: Optional[Tensor],
                     found_inf: Optional[Tensor]) -> None:
        """note [sparse grads]: torch.optim.Adagrad's own update of the params with sparse grads."""
        grads = self._unscaled_sparse(items, grad_scale, found_inf)
        if grads is None:
            return
        for (group, p), g in zip(items, grads):
            state = self.state.get(p) or self.state.setdefault(p, self._new_state(p, group))
            _torch_adagrad([p], [g], [state["sum"]], [state["step"]], has_sparse_grad=True,
                                        foreach=False, lr=group["lr"], weight_decay=group["weight_decay"],
                                        lr_decay=group["lr_decay"], eps=group["eps"], maximize=group["maximize"])

    def _call_flags(self, group: dict[str, Any], fresh: bool) -> tuple:
        return (bool(group["maximize"]),)

    def _new_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        value = self.defaults["initial_accumulator_value"]  # torch's: the constructor's, whatever the group's
        return {
            "step": torch.zeros((), dtype=torch.float32, device=p.device),
            "sum": torch.full_like(p, complex(value, value) if p.is_complex() else value,
                                   dtype=state_dtype_of(group, p.dtype), memory_format=torch.preserve_format),
        }

    def _state_keys(self, group: dict[str, Any]) -> tuple[tuple[str, str], ...]:
        return (("state_sums", "sum"), ("state_steps", "step"))

    def _call_kwargs(self, flags: tuple, groups: list[dict[str, Any]]) -> dict[str, Any]:
        (maximize,) = flags
        return dict(
            lr_decay=[float(g["lr_decay"]) for g in groups],
            weight_decay=[float(g["weight_decay"]) for g in groups],
            eps=[float(g["eps"]) for g in groups],
            l1_weight_decay=[float(g["l1_weight_decay"]) for g in groups],
            maximize=maximize,
        )
