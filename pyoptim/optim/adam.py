"""Adam and AdamW: drop-ins for torch.optim.Adam and torch.optim.AdamW."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor

from pyoptim._validation import check_adam_args
from pyoptim.optim._base import FusedOptimizer, _as_float

__all__ = ["Adam", "AdamW"]


class Adam(FusedOptimizer):
    """torch.optim.Adam's arguments, state and semantics, with each step one fused kernel call per (device, dtype).

    Extra keywords: `backend` ("cuda", "triton", "cpu" or "reference"; default:
    $PYOPTIM_BACKEND, else the fastest present for the params' device) and
    `max_grad_norm` (clip the grads' global L2 norm inside the step, as
    torch.nn.utils.clip_grad_norm_ would, without writing the grads; the
    pre-clip norm is kept in `optimizer.grad_norm`), `l1_weight_decay`
    (per group: the step is that of loss + l1_weight_decay * sum(|p|), its
    gradient l1 * sign(p) added to the unscaled, clipped grad, with maximize's
    sign applied before it, so L1 always pulls towards 0) and `flat` (keep
    each group's params, grads and state as views of one buffer per device
    and dtype, so a step is one kernel over it: note [flat storage]), and the precision policy of
    pyoptim.optim._base's note [precision policy]: `master_weights` (None, "fp32", "remainder" or
    "stochastic", per group), `state_dtype` (the moments' dtype; None: the param's under master_weights
    None, else float32) and `stochastic_seed` (the random stream of "stochastic").
    `foreach` and `fused` are accepted for compatibility and change nothing.
    """

    _op = "adam_step_"
    _supports_precision = True
    _check_args = staticmethod(check_adam_args)
    _lists = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps")
    # (and pyoptim's own l1_weight_decay, so a state_dict of torch's loads)
    _torch_defaults = dict(amsgrad=False, maximize=False, foreach=None, capturable=False, differentiable=False,
                           fused=None, decoupled_weight_decay=False, l1_weight_decay=0.0)

    def __init__(
        self,
        params: Any,
        lr: Union[float, Tensor] = 1e-3,
        betas: tuple[Union[float, Tensor], Union[float, Tensor]] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        foreach: Optional[bool] = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        decoupled_weight_decay: bool = False,
        max_grad_norm: Optional[float] = None,
        l1_weight_decay: float = 0.0,
        backend: Optional[str] = None,
        flat: bool = False,
        master_weights: Optional[str] = None,
        state_dtype: Optional[torch.dtype] = None,
        stochastic_seed: int = 0,
    ) -> None:
        # torch.optim.Adam's checks and messages.
        if isinstance(lr, Tensor):
            if foreach and not capturable:
                raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
            if lr.numel() != 1:
                raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= l1_weight_decay:
            raise ValueError(f"Invalid l1_weight_decay value: {l1_weight_decay}")
        if not (
            (isinstance(betas[0], float) and isinstance(betas[1], float))
            or (isinstance(betas[0], Tensor) and isinstance(betas[1], Tensor))
        ):
            raise ValueError("betas must be either both floats or both Tensors")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                        foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay, l1_weight_decay=l1_weight_decay)
        super().__init__(params, defaults, max_grad_norm, backend, flat, master_weights, state_dtype, stochastic_seed)

    def _sparse_message(self) -> str:
        return "Adam does not support sparse gradients, please consider SparseAdam instead"

    def _call_flags(self, group: dict[str, Any], fresh: bool) -> tuple:
        return bool(group["amsgrad"]), bool(group["maximize"]), bool(group["decoupled_weight_decay"])

    def _new_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        state = {
            "step": torch.zeros((), dtype=torch.float32, device=p.device),
            "exp_avg": self._zeros(p, group),
            "exp_avg_sq": self._zeros(p, group),
        }
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = self._zeros(p, group)
        return state

    def _state_keys(self, group: dict[str, Any]) -> tuple[tuple[str, str], ...]:
        keys = (("exp_avgs", "exp_avg"), ("exp_avg_sqs", "exp_avg_sq"), ("state_steps", "step"))
        return keys + ((("max_exp_avg_sqs", "max_exp_avg_sq"),) if group["amsgrad"] else ())

    def _call_kwargs(self, flags: tuple, groups: list[dict[str, Any]]) -> dict[str, Any]:
        amsgrad, maximize, decoupled = flags
        return dict(
            beta1=[_as_float(g["betas"][0]) for g in groups],
            beta2=[_as_float(g["betas"][1]) for g in groups],
            weight_decay=[float(g["weight_decay"]) for g in groups],
            eps=[float(g["eps"]) for g in groups],
            l1_weight_decay=[float(g["l1_weight_decay"]) for g in groups],
            amsgrad=amsgrad,
            maximize=maximize,
            decoupled_weight_decay=decoupled,
        )


class AdamW(Adam):
    """torch.optim.AdamW: Adam with decoupled weight decay (default weight_decay=1e-2)."""

    _torch_defaults = dict(Adam._torch_defaults, decoupled_weight_decay=True)

    def __init__(
        self,
        params: Any,
        lr: Union[float, Tensor] = 1e-3,
        betas: tuple[Union[float, Tensor], Union[float, Tensor]] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
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
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
            capturable=capturable, differentiable=differentiable, fused=fused, decoupled_weight_decay=True,
            max_grad_norm=max_grad_norm, l1_weight_decay=l1_weight_decay, backend=backend, flat=flat,
            master_weights=master_weights, state_dtype=state_dtype, stochastic_seed=stochastic_seed,
        )
