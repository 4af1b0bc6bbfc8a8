"""LAMB (You et al., 2019): a fused layer-wise adaptive optimizer for large batches."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor

from pyoptim import _dtensor, functional
from pyoptim._validation import check_lamb_args
from pyoptim.optim._base import FusedOptimizer, _as_float
from pyoptim.optim.lion import _check_common

__all__ = ["LAMB"]


class LAMB(FusedOptimizer):
    """LAMB, "Large Batch Optimization for Deep Learning" (You et al., 2019), one fused op call per step.

    Per param p (a tensor), with g its grad (unscaled by GradScaler, negated
    by `maximize`, and scaled by the global clip factor
    min(1, max_grad_norm / (||all grads|| + 1e-6)) when `max_grad_norm` is
    set, before the moments), t its advanced `step`, and m, v its `exp_avg`,
    `exp_avg_sq` states:

        g = g + l1_weight_decay * sign(p)                 (when l1_weight_decay > 0)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        u = (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps) + weight_decay * p
        r = ||p|| / ||u||     (L2 norms over the whole tensor; r = 1 where either is 0)
        p = p - lr * r * u

    The trust ratio applies to every param (biases and norm weights too: put
    them in a group of their own to change their lr or weight_decay). The op
    makes two passes over memory: the first writes m and v and reduces each
    tensor's ||p||^2 and ||u||^2 in a fixed order (deterministic), the second
    recomputes u and moves p; u is computed from m and v as stored (in the
    params' dtype), so r is the ratio of the u applied. Extra keywords `backend` and `l1_weight_decay`
    as in pyoptim.optim.Adam; `foreach`, `fused` and `capturable` are
    accepted and change nothing.

    The precision policy as in pyoptim.optim.Adam (pyoptim.optim._base's note
    [precision policy]): `master_weights` (None, "fp32", "remainder" or
    "stochastic", per group), `state_dtype` (the dtype of exp_avg and
    exp_avg_sq; None: the param's under master_weights None, else float32)
    and `stochastic_seed`. p above is the fp32 master wherever it is read
    (weight decay and ||p||), so the trust ratio is the master's: a bf16 run
    with "fp32" or "remainder" masters keeps masters bit-identical to an
    fp32-param run fed the same grads. LAMB's own `step` keys the
    stochastic draws.
    """

    # The trust ratio is per tensor: one call over a flat buffer would take the norms of the whole group.
    _supports_flat = False
    _op = "lamb_step_"
    _supports_precision = True
    _check_args = staticmethod(check_lamb_args)
    _lists = ("params", "grads", "exp_avgs", "exp_avg_sqs", "state_steps")
    _torch_defaults = dict(maximize=False, foreach=None, capturable=False, differentiable=False, fused=None,
                           l1_weight_decay=0.0)

    def __init__(
        self,
        params: Any,
        lr: Union[float, Tensor] = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        max_grad_norm: Optional[float] = None,
        l1_weight_decay: float = 0.0,
        backend: Optional[str] = None,
        master_weights: Optional[str] = None,
        state_dtype: Optional[torch.dtype] = None,
        stochastic_seed: int = 0,
    ) -> None:
        _check_common(lr, betas, weight_decay, l1_weight_decay)
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize, foreach=foreach,
                        capturable=capturable, differentiable=differentiable, fused=fused,
                        l1_weight_decay=l1_weight_decay)
        super().__init__(params, defaults, max_grad_norm, backend, False, master_weights, state_dtype,
                         stochastic_seed)

    def _call_flags(self, group: dict[str, Any], fresh: bool) -> tuple:
        return (bool(group["maximize"]),)

    def _run_call(self, call: tuple, classes: Optional[list]) -> None:
        """One lamb_step_ call; over DTensor shards, its two passes with the norms reduced in between.

        note [LAMB's two passes]: the trust ratio r = ||p|| / ||u|| is per
        tensor, and a shard's local norms are not its tensor's. Over a bucket
        holding DTensor shards the step is lamb_moments_ (m, v and steps
        moved; each tensor's ||p||^2 and ||u||^2 returned), one reduction of
        those partial sums across each mesh (pyoptim/_dtensor.py's
        reduce_sums: one all-reduce per mesh dimension for the whole bucket),
        then lamb_apply_ with the global norms. Plain tensors of the bucket
        keep their own norms. One call of lamb_step_ does the same passes with
        nothing in between.
        """
        if classes is None or all(c is None for c in classes):
            return super()._run_call(call, classes)
        _, backend, args, kwargs = call
        norms = functional.lamb_moments_(*args, **kwargs, backend=backend)
        # Per norm class, its tensors' columns (the others 0): the classes of a mesh add up without overlapping
        # and travel in one all-reduce.
        columns: dict[Any, list[int]] = {}
        for i, c in enumerate(classes):
            columns.setdefault(c, []).append(i)
        parts: dict[Any, Tensor] = {}
        for c, cols in columns.items():
            index = torch.tensor(cols, device=norms.device)
            parts[c] = torch.zeros_like(norms).index_copy_(1, index, norms.index_select(1, index))
        functional.lamb_apply_(*args, _dtensor.reduce_sums(parts), **kwargs, backend=backend)

    def _new_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        return {
            "step": torch.zeros((), dtype=torch.float32, device=p.device),
            "exp_avg": self._zeros(p, group),
            "exp_avg_sq": self._zeros(p, group),
        }

    def _state_keys(self, group: dict[str, Any]) -> tuple[tuple[str, str], ...]:
        return (("exp_avgs", "exp_avg"), ("exp_avg_sqs", "exp_avg_sq"), ("state_steps", "step"))

    def _call_kwargs(self, flags: tuple, groups: list[dict[str, Any]]) -> dict[str, Any]:
        (maximize,) = flags
        return dict(
            beta1=[_as_float(g["betas"][0]) for g in groups],
            beta2=[_as_float(g["betas"][1]) for g in groups],
            weight_decay=[float(g["weight_decay"]) for g in groups],
            eps=[float(g["eps"]) for g in groups],
            l1_weight_decay=[float(g["l1_weight_decay"]) for g in groups],
            maximize=maximize,
        )
