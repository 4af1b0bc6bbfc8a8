"""Adam and AdamW: drop-ins for torch.optim.Adam and torch.optim.AdamW."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import Tensor

from pyoptim import _backends
from pyoptim._validation import check_adam_args
from pyoptim.functional import adam_step_

__all__ = ["Adam", "AdamW"]

_ParamsT = Union[Iterable[Tensor], Iterable[dict[str, Any]]]


def _as_float(x: Union[float, Tensor]) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


class Adam(torch.optim.Optimizer):
    """torch.optim.Adam's arguments, state and semantics, with each step one fused kernel call per (device, dtype).

    Extra keyword: `backend` ("cuda", "triton", "cpu" or "reference"; default:
    $PYOPTIM_BACKEND, else the fastest present for the params' device).
    `foreach` and `fused` are accepted for compatibility and change nothing.
    """

    # GradScaler hands grad_scale and found_inf to step() instead of unscaling
    # the grads itself; the kernel divides by the scale and skips inf steps.
    _step_supports_amp_scaling = True
    _default_decoupled = False

    def __init__(
        self,
        params: _ParamsT,
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
        decoupled_weight_decay: Optional[bool] = None,
        backend: Optional[str] = None,
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
        if not (
            (isinstance(betas[0], float) and isinstance(betas[1], float))
            or (isinstance(betas[0], Tensor) and isinstance(betas[1], Tensor))
        ):
            raise ValueError("betas must be either both floats or both Tensors")
        if fused and foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        if differentiable:
            raise RuntimeError(
                f"pyoptim.optim.{type(self).__name__} does not support differentiable=True "
                f"(use torch.optim.{type(self).__name__})"
            )
        if backend is not None and backend not in _backends.BACKENDS:
            raise ValueError(f"pyoptim: unknown backend {backend!r}; expected one of {_backends.BACKENDS}")
        if decoupled_weight_decay is None:
            decoupled_weight_decay = self._default_decoupled
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
            backend=backend,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's add_param_group, except that a parameter listed twice in a group raises ValueError."""
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        if len({id(p) for p in params if isinstance(p, Tensor)}) != len(params):
            # torch only warns, then updates the parameter twice per step.
            raise ValueError("optimizer contains a parameter group with duplicate parameters")
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)
            group.setdefault("decoupled_weight_decay", self._default_decoupled)
            group.setdefault("backend", None)
            for p in group["params"]:
                st = self.state.get(p)
                if st and "step" in st:
                    st["step"] = self._step_tensor(st["step"], p)

    @staticmethod
    def _step_tensor(step: Union[float, Tensor], p: Tensor) -> Tensor:
        # note [step placement]: a float32 0-d tensor on the param's device,
        # as torch's fused and capturable Adam keep it, whatever a loaded
        # state_dict held (torch's for-loop Adam keeps it on the CPU): the
        # kernels read it in place, with no host sync.
        if isinstance(step, Tensor):
            if step.device == p.device and step.dtype == torch.float32 and step.dim() == 0:
                return step
            return step.detach().reshape(()).to(device=p.device, dtype=torch.float32)
        return torch.tensor(float(step), dtype=torch.float32, device=p.device)

    def _bucket_key(self, group: dict[str, Any], p: Tensor) -> tuple:
        dtype = torch.view_as_real(p).dtype if p.is_complex() else p.dtype
        return (p.device, dtype, bool(group["amsgrad"]), bool(group["maximize"]),
                bool(group["decoupled_weight_decay"]), group["backend"])

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """Perform a single optimization step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale: Optional[Tensor] = getattr(self, "grad_scale", None)
        found_inf: Optional[Tensor] = getattr(self, "found_inf", None)

        # Gather every param with a grad into buckets of one (device, dtype,
        # amsgrad, maximize, backend); within a bucket, tensors stay ordered
        # by param group and each group's hyperparameters ride along, so many
        # groups still make one kernel call.
        buckets: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        new_state: dict[Tensor, dict[str, Tensor]] = {}
        for group in self.param_groups:
            group_buckets = set()
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("Adam does not support sparse gradients, please consider SparseAdam instead")
                state = self.state.get(p)
                if not state:
                    state = self._new_state(p, group["amsgrad"])
                    new_state[p] = state
                key = self._bucket_key(group, p)
                b = buckets[key]
                if key not in group_buckets:
                    group_buckets.add(key)
                    b["groups"].append(group)
                    b["group_sizes"].append(0)
                b["group_sizes"][-1] += 1
                if p.is_complex():
                    p, grad = torch.view_as_real(p), torch.view_as_real(grad)
                    real = torch.view_as_real
                else:
                    real = None
                b["params"].append(p)
                b["grads"].append(grad)
                for name, key2 in (("exp_avgs", "exp_avg"), ("exp_avg_sqs", "exp_avg_sq")):
                    t = state[key2]
                    b[name].append(real(t) if real else t)
                if group["amsgrad"]:
                    t = state["max_exp_avg_sq"]
                    b["max_exp_avg_sqs"].append(real(t) if real else t)
                b["state_steps"].append(state["step"])

        calls = [self._call_args(key, b, grad_scale, found_inf) for key, b in buckets.items()]
        if len(calls) > 1:
            # note [exception safety]: each call checks its own arguments
            # before writing; with several calls, check them all before the
            # first one writes anything.
            for _, args, kwargs in calls:
                kwargs = {k: v for k, v in kwargs.items() if k not in ("maximize", "decoupled_weight_decay", "backend")}
                check_adam_args(*args, **kwargs)
        for backend, args, kwargs in calls:
            adam_step_(*args, **kwargs, backend=backend)
        self.state.update(new_state)
        return loss

    def _new_state(self, p: Tensor, amsgrad: bool) -> dict[str, Tensor]:
        state = {
            "step": torch.zeros((), dtype=torch.float32, device=p.device),
            "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
        }
        if amsgrad:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _call_args(self, key: tuple, b: dict[str, list], grad_scale: Optional[Tensor], found_inf: Optional[Tensor]):
        device, _, amsgrad, maximize, decoupled, backend = key
        groups = b["groups"]
        lrs = [g["lr"] for g in groups]
        lr_tensor = None
        if any(isinstance(lr, Tensor) and lr.device.type != "cpu" for lr in lrs) and device.type != "cpu":
            # Read lr on the device (capturable, no host sync): one float64
            # value per group (exact for float32 and float64 lr tensors).
            lr_tensor = torch.stack([
                lr.reshape(()).to(device=device, dtype=torch.float64) if isinstance(lr, Tensor)
                else torch.full((), lr, dtype=torch.float64, device=device)
                for lr in lrs
            ])
            lr_floats = [0.0] * len(lrs)
        else:
            lr_floats = [_as_float(lr) for lr in lrs]
        if grad_scale is not None and grad_scale.device != device:
            grad_scale = grad_scale.to(device, non_blocking=True)
        if found_inf is not None and found_inf.device != device:
            found_inf = found_inf.to(device, non_blocking=True)
        args = (b["params"], b["grads"], b["exp_avgs"], b["exp_avg_sqs"], b["max_exp_avg_sqs"], b["state_steps"])
        kwargs = dict(
            lr=lr_floats,
            beta1=[_as_float(g["betas"][0]) for g in groups],
            beta2=[_as_float(g["betas"][1]) for g in groups],
            weight_decay=[float(g["weight_decay"]) for g in groups],
            eps=[float(g["eps"]) for g in groups],
            group_sizes=b["group_sizes"],
            amsgrad=amsgrad,
            maximize=maximize,
            decoupled_weight_decay=decoupled,
            lr_tensor=lr_tensor,
            grad_scale=grad_scale,
            found_inf=found_inf,
        )
        return backend, args, kwargs


class AdamW(Adam):
    """torch.optim.AdamW: Adam with decoupled weight decay (default weight_decay=1e-2)."""

    _default_decoupled = True

    def __init__(
        self,
        params: _ParamsT,
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
        backend: Optional[str] = None,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
            capturable=capturable, differentiable=differentiable, fused=fused, decoupled_weight_decay=True,
            backend=backend,
        )
