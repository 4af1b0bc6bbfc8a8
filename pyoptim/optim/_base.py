"""What every pyoptim optimizer shares: bucketing params into fused op calls,
the fused gradient clip, GradScaler's protocol and exception safety.

A subclass names its op and says, per param group and param, which state it
keeps and which hyperparameters ride along; torch.optim.Optimizer provides
param groups, state_dict, hooks and zero_grad.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor

from pyoptim import _backends, functional

def _as_float(x: Union[float, Tensor]) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


class _Bucket:
    """The tensors and groups of one op call: one device, dtype and set of call-wide flags."""

    def __init__(self, lists: tuple[str, ...]) -> None:
        self.lists: dict[str, list[Tensor]] = {name: [] for name in lists}
        self.groups: list[dict[str, Any]] = []
        self.group_sizes: list[int] = []


class FusedOptimizer(torch.optim.Optimizer):
    """Base of pyoptim's optimizers: one fused op call per bucket of (device, dtype, call-wide flags)."""

    # GradScaler hands grad_scale and found_inf to step() instead of unscaling
    # the grads itself; the kernels divide by the scale and skip inf steps.
    _step_supports_amp_scaling = True
    _op: str  # the functional op, e.g. "adam_step_"
    _check_args: Callable[..., None]  # its argument checks (pyoptim._validation)
    _lists: tuple[str, ...]  # the op's tensor lists, in order
    _torch_defaults: dict[str, Any]  # group keys torch's twin keeps, and their defaults

    def __init__(self, params: Any, defaults: dict[str, Any], max_grad_norm: Optional[float],
                 backend: Optional[str]) -> None:
        if backend is not None and backend not in _backends.BACKENDS:
            raise ValueError(f"pyoptim: unknown backend {backend!r}; expected one of {_backends.BACKENDS}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"Invalid max_grad_norm value: {max_grad_norm}")
        if defaults.get("differentiable"):
            raise RuntimeError(f"pyoptim.optim.{type(self).__name__} does not support differentiable=True "
                               f"(use torch.optim.{type(self).__name__})")
        if defaults.get("fused") and defaults.get("foreach"):
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        #: clip the grads' global L2 norm to this inside the step (None: no clip)
        self.max_grad_norm = max_grad_norm
        #: the grads' global L2 norm before clipping, of the last step (0-d tensor), when max_grad_norm is set
        self.grad_norm: Optional[Tensor] = None
        super().__init__(params, dict(defaults, backend=backend))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's add_param_group, except that a parameter listed twice in a group raises ValueError."""
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        if len({id(p) for p in params}) != len(params):
            # torch only warns, then updates the parameter twice per step.
            raise ValueError("optimizer contains a parameter group with duplicate parameters")
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("max_grad_norm", None)
        self.__dict__.setdefault("grad_norm", None)
        for group in self.param_groups:
            for key, value in self._torch_defaults.items():
                group.setdefault(key, value)
            group.setdefault("backend", None)
            for p in group["params"]:
                st = self.state.get(p)
                if st and "step" in st:
                    st["step"] = self._step_tensor(st["step"], p)

    @staticmethod
    def _step_tensor(step: Union[float, Tensor], p: Tensor) -> Tensor:
        # note [step placement]: a float32 0-d tensor on the param's device,
        # as torch's fused and capturable optimizers keep it, whatever a
        # loaded state_dict held (torch's for-loop keeps it on the CPU): the
        # kernels read it in place, with no host sync.
        if isinstance(step, Tensor):
            if step.device == p.device and step.dtype == torch.float32 and step.dim() == 0:
                return step
            return step.detach().reshape(()).to(device=p.device, dtype=torch.float32)
        return torch.tensor(float(step), dtype=torch.float32, device=p.device)

    # -- what a subclass provides ------------------------------------------------

    def _call_flags(self, group: dict[str, Any], fresh: bool) -> tuple:
        """Flags that must be the same for every tensor of one op call (`fresh`: the param's first step)."""
        raise NotImplementedError

    def _new_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        """The state of a param's first step (empty dict: keeps none)."""
        raise NotImplementedError

    def _state_keys(self, group: dict[str, Any]) -> tuple[tuple[str, str], ...]:
        """(op list, state key) of the op's lists other than params and grads, for this group's params."""
        raise NotImplementedError

    def _call_kwargs(self, flags: tuple, groups: list[dict[str, Any]]) -> dict[str, Any]:
        """The op's keyword arguments other than lr, group_sizes and the StepAux ones."""
        raise NotImplementedError

    def _sparse_message(self) -> str:
        return f"{type(self).__name__} does not support sparse gradients"

    # -- the step ------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """Perform a single optimization step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale: Optional[Tensor] = getattr(self, "grad_scale", None)
        found_inf: Optional[Tensor] = getattr(self, "found_inf", None)

        buckets = self._gather_cached()
        new_state: dict[Tensor, dict[str, Tensor]] = {}
        if buckets is None:
            buckets, new_state = self._gather()

        calls = [self._call(key, b, grad_scale, found_inf) for key, b in buckets.items()]
        if self.max_grad_norm is not None and calls:
            self._fuse_clip(calls, grad_scale)
        if len(calls) > 1:
            # note [exception safety]: each call checks its own arguments
            # before writing; with several calls, check them all before the
            # first one writes anything.
            for _, _, args, kwargs in calls:
                type(self)._check_args(*args, **kwargs)
        for op, backend, args, kwargs in calls:
            getattr(functional, op)(*args, **kwargs, backend=backend)
        self.state.update(new_state)
        return loss

    def _gather(self) -> tuple[dict[tuple, _Bucket], dict[Tensor, dict[str, Tensor]]]:
        """Every param with a grad, in buckets of one device, dtype and set of call-wide flags; and new state.

        Within a bucket tensors stay ordered by param group and each group's
        hyperparameters ride along, so many groups still make one call.
        Records the plan _gather_cached() reuses when the step qualifies.
        """
        buckets: dict[tuple, _Bucket] = {}
        new_state: dict[Tensor, dict[str, Tensor]] = {}
        plan: Optional[list] = []  # (key, bucket, params, state dicts) of a step that can be replayed
        state_of = self.state.get
        for group in self.param_groups:
            # Per group, not per param: this loop is the Python cost of a step
            # over thousands of small tensors.
            seen = set()
            keys = self._state_keys(group)
            flags = {False: self._call_flags(group, False), True: self._call_flags(group, True)}
            backend = group["backend"]
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    plan = None  # a param without a grad: the next step may differ
                    continue
                if grad.is_sparse:
                    raise RuntimeError(self._sparse_message())
                state = state_of(p)
                fresh = not state
                if fresh:
                    state = self._new_state(p, group)
                    if state:
                        new_state[p] = state
                key = (p.device, p.dtype, backend) + flags[fresh]
                bucket = buckets.get(key)
                if bucket is None:
                    bucket = buckets[key] = _Bucket(self._lists)
                    if plan is not None:
                        plan.append((key, bucket, [], [], keys))
                if key not in seen:
                    seen.add(key)
                    bucket.groups.append(group)
                    bucket.group_sizes.append(0)
                bucket.group_sizes[-1] += 1
                lists = bucket.lists
                if p.is_complex():  # as torch: the update of a complex param is that of its real view
                    plan = None
                    lists["params"].append(torch.view_as_real(p))
                    lists["grads"].append(torch.view_as_real(grad))
                    for name, k in keys:
                        t = state[k]
                        lists[name].append(torch.view_as_real(t) if t.is_complex() else t)
                else:
                    lists["params"].append(p)
                    lists["grads"].append(grad)
                    for name, k in keys:
                        lists[name].append(state[k])
                    if plan is not None:
                        entry = next(e for e in plan if e[0] == key) if plan[-1][0] != key else plan[-1]
                        entry[2].append(p)
                        entry[3].append(state)
        # note [step plan]: a step that created no state, saw every param with
        # a grad and no complex one is recorded; the next steps reuse its
        # buckets and read only the grads and (by key) the state tensors anew.
        self._plan = None
        if plan is not None and not new_state:
            self._plan = (self._plan_signature(), tuple(self.state.values()),
                          [(key, b.groups, b.group_sizes, params, states, keys)
                           for key, b, params, states, keys in plan])
        return buckets, new_state

    def _plan_signature(self) -> tuple:
        """What a recorded plan depends on besides the state: the groups, their params, backend and flags."""
        return (id(self.state), len(self.state), tuple(
            (id(g), id(g["params"]), len(g["params"]), g["backend"], self._call_flags(g, False))
            for g in self.param_groups))

    def _gather_cached(self) -> Optional[dict[tuple, _Bucket]]:
        """The buckets of the recorded plan with this step's grads, or None when the plan does not apply."""
        plan = self.__dict__.get("_plan")
        if plan is None:
            return None
        signature, state_values, entries = plan
        if signature != self._plan_signature() or not all(map(operator.is_, self.state.values(), state_values)):
            return None  # groups changed, or a param's state dict was replaced
        buckets: dict[tuple, _Bucket] = {}
        for key, groups, group_sizes, params, states, keys in entries:
            grads = [p.grad for p in params]
            for g in grads:
                if g is None:
                    return None
                if g.is_sparse:
                    raise RuntimeError(self._sparse_message())
            b = _Bucket(self._lists)
            b.groups, b.group_sizes = groups, group_sizes
            b.lists["params"] = params
            b.lists["grads"] = grads
            for name, k in keys:
                b.lists[name] = [st[k] for st in states]
            buckets[key] = b
        return buckets

    def _call(self, key: tuple, b: _Bucket, grad_scale: Optional[Tensor], found_inf: Optional[Tensor]):
        device, _, backend = key[:3]
        lrs = [g["lr"] for g in b.groups]
        lr_tensor = None
        if device.type != "cpu" and any(isinstance(lr, Tensor) and lr.device.type != "cpu" for lr in lrs):
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
        args = tuple(b.lists[name] for name in self._lists)
        kwargs = dict(self._call_kwargs(key[3:], b.groups), lr=lr_floats, group_sizes=b.group_sizes,
                      lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf)
        return self._op, backend, args, kwargs

    def _fuse_clip(self, calls: list, grad_scale: Optional[Tensor]) -> None:
        """One norm pass over all grads; the clip factor is applied inside each step kernel."""
        totals = []
        for _, backend, args, _ in calls:
            grads = args[1]
            norm_backend = backend if backend in _backends.available("multi_tensor_norm", grads[0].device.type) \
                else None
            totals.append(functional.multi_tensor_norm(grads, 2.0, backend=norm_backend)[0])
        device0 = totals[0].device
        total = totals[0] if len(totals) == 1 else torch.linalg.vector_norm(
            torch.stack([t.to(device0, non_blocking=True) for t in totals]))
        for _, _, args, kwargs in calls:
            kwargs["grad_norm"] = total if total.device == args[0][0].device else total.to(args[0][0].device)
            kwargs["max_grad_norm"] = float(self.max_grad_norm)
        if grad_scale is not None:
            total = total * grad_scale.double().reciprocal().float().to(device0)  # the unscaled grads' norm
        self.grad_norm = total
