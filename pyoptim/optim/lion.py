"""Lion (Chen et al., 2023): a fused drop-in for the lion-pytorch package's Lion."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor

from pyoptim._validation import check_lion_args
from pyoptim.optim._base import FusedOptimizer, _as_float, effective_policy

__all__ = ["Lion"]


def _check_common(lr, betas, weight_decay, l1_weight_decay) -> None:
    """torch.optim's checks and messages for the arguments Lion and LAMB share with Adam."""
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if not 0.0 <= l1_weight_decay:
        raise ValueError(f"Invalid l1_weight_decay value: {l1_weight_decay}")


class Lion(FusedOptimizer):
    """Lion, "Symbolic Discovery of Optimization Algorithms" (Chen et al., 2023), one fused kernel call per step.

    Per param, with g its grad (unscaled by GradScaler, clipped by
    `max_grad_norm`, negated by `maximize`) and m its `exp_avg` state:

        g = g + l1_weight_decay * sign(p)         (when l1_weight_decay > 0)
        p = p * (1 - lr * weight_decay)
        p = p - lr * sign(beta1 * m + (1 - beta1) * g)
        m = beta2 * m + (1 - beta2) * g

    the update of the paper's algorithm and of the lion-pytorch package, whose
    state_dicts load here and back (state `exp_avg`; no step count). Extra
    keywords `backend`, `max_grad_norm`, `l1_weight_decay`, `flat` and the
    precision policy (`master_weights`, `state_dtype`: the exp_avg's dtype,
    `stochastic_seed`) as in pyoptim.optim.Adam; `foreach`, `fused` and
    `capturable` are accepted and change nothing. Under
    master_weights="stochastic" a 16-bit param's state also holds a `step`
    counter (Lion keeps none otherwise), which the random bits hash.
    """

    _op = "lion_step_"
    _check_args = staticmethod(check_lion_args)
    _lists = ("params", "grads", "exp_avgs")
    _supports_precision = True
    # Group keys lion-pytorch does not keep, with their defaults (a state_dict of its loads).
    _torch_defaults = dict(maximize=False, foreach=None, capturable=False, differentiable=False, fused=None,
                           l1_weight_decay=0.0)

    def __init__(
        self,
        params: Any,
        lr: Union[float, Tensor] = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        capturable: bool = False,
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
        _check_common(lr, betas, weight_decay, l1_weight_decay)
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize, foreach=foreach,
                        capturable=capturable, differentiable=differentiable, fused=fused,
                        l1_weight_decay=l1_weight_decay)
        super().__init__(params, defaults, max_grad_norm, backend, flat, master_weights, state_dtype, stochastic_seed)

    def _call_flags(self, group: dict[str, Any], fresh: bool) -> tuple:
        return (bool(group["maximize"]),)

    def _new_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        state = {"exp_avg": self._zeros(p, group)}
        if effective_policy(group, p.dtype) == "stochastic":
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)  # note [stochastic key]
        return state

    def _policy_lists(self, policy: Optional[str]) -> tuple[tuple[str, str], ...]:
        # lion_step_ keeps no step: stochastic rounding's counters ride along as state_steps (as SGD's).
        return (("step", "state_steps"),) if policy == "stochastic" else super()._policy_lists(policy)

    def _state_keys(self, group: dict[str, Any]) -> tuple[tuple[str, str], ...]:
        return (("exp_avgs", "exp_avg"),)

    def _call_kwargs(self, flags: tuple, groups: list[dict[str, Any]]) -> dict[str, Any]:
        (maximize,) = flags
        return dict(
            beta1=[_as_float(g["betas"][0]) for g in groups],
            beta2=[_as_float(g["betas"][1]) for g in groups],
            weight_decay=[float(g["weight_decay"]) for g in groups],
            l1_weight_decay=[float(g["l1_weight_decay"]) for g in groups],
            maximize=maximize,
        )
