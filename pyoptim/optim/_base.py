"""What every pyoptim optimizer shares: bucketing params into fused op calls,
the fused gradient clip, GradScaler's protocol and exception safety.

A subclass names its op and says, per param group and param, which state it
keeps and which hyperparameters ride along; torch.optim.Optimizer provides
param groups, state_dict, hooks and zero_grad.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor
from torch.optim import optimizer as _optimizer

from pyoptim import _backends, _dtensor, functional
from pyoptim.optim._flat import FlatUnit, can_flatten

# Backends the step plan replays (dispatcher ops); the Python ones take the ordinary path.
_DISPATCHED = ("cpu", "cuda")
# The op keywords a plan keeps as recorded (group_sizes; the precision policy's lists, state tensors the plan
# watches like the others, and seed) or fills itself (the clip's).
_RECORDED = ("group_sizes", "grad_norm", "max_grad_norm", "master_params", "param_remainders", "stochastic_seed",
             "state_steps")
# Param types the plan reads in C++; a tensor subclass (DTensor) takes the ordinary path.
_PLAIN = (Tensor, torch.nn.Parameter)

# note [precision policy] (issue 15): a group's `master_weights` says where a 16-bit param's fp32 value lives and
# how the step's fp32 result goes back into it (csrc/include/pyoptim/precision.h):
#   None          the param itself, rounded to nearest (torch's behaviour)
#   "fp32"        an fp32 copy in state["master_param"]; the param is it rounded to nearest
#   "remainder"   bf16 param + int16 state["param_remainder"] is the fp32 master exactly (2 bytes a param)
#   "stochastic"  no extra state: the result is stochastically rounded into the bf16 param, the random bits a
#                 hash of (the group's stochastic_seed, the step, the tensor, the element): reproducible
# fp32 and fp64 params are their own masters: "fp32" and "stochastic" leave them as None does. `state_dtype` is
# the moments' dtype: None means the param's dtype under master_weights None (as torch) and fp32 otherwise.
MASTER_WEIGHTS = (None, "fp32", "remainder", "stochastic")
_HALF = (torch.float16, torch.bfloat16)
# The state key of each policy's extra state, and its op list.
_POLICY_STATE = {"fp32": ("master_param", "master_params"), "remainder": ("param_remainder", "param_remainders")}


def effective_policy(group: dict[str, Any], dtype: torch.dtype) -> Optional[str]:
    """The group's master_weights as it applies to params of `dtype` (None for fp32/fp64 params)."""
    policy = group.get("master_weights")
    return policy if dtype in _HALF else None


def state_dtype_of(group: dict[str, Any], dtype: torch.dtype) -> torch.dtype:
    """The dtype of the moments of a param of `dtype` in `group` (note [precision policy])."""
    wanted = group.get("state_dtype")
    if wanted is not None:
        return wanted
    return torch.float32 if effective_policy(group, dtype) is not None else dtype


def check_precision_group(group: dict[str, Any], supported: bool, name: str) -> None:
    """ValueError for a group's master_weights / state_dtype that no step could serve (before any state exists)."""
    policy, state_dtype = group.get("master_weights"), group.get("state_dtype")
    if policy not in MASTER_WEIGHTS:
        raise ValueError(f"Invalid master_weights: {policy!r}; expected one of {MASTER_WEIGHTS}")
    if state_dtype is not None and not (isinstance(state_dtype, torch.dtype) and state_dtype.is_floating_point):
        raise ValueError(f"Invalid state_dtype: {state_dtype!r}; expected a floating torch.dtype")
    if not supported and (policy is not None or state_dtype is not None):
        raise ValueError(f"pyoptim.optim.{name} does not support master_weights or state_dtype yet")
    if not isinstance(group.get("stochastic_seed", 0), int):
        raise ValueError(f"Invalid stochastic_seed: {group.get('stochastic_seed')!r}; expected an int")
    for p in group["params"]:
        if policy == "remainder" and p.dtype != torch.bfloat16:
            raise ValueError(f"master_weights='remainder' needs bfloat16 params, got {p.dtype}")
        if policy == "stochastic" and p.dtype == torch.float16:
            raise ValueError("master_weights='stochastic' supports bfloat16 params (and leaves fp32 ones as None "
                             "does), got torch.float16")
        sd = state_dtype_of(group, p.dtype)
        if p.is_floating_point() and sd != p.dtype and (p.dtype == torch.float64
                                                         or sd not in (torch.float32, torch.bfloat16)):
            raise ValueError(f"state_dtype {sd} for {p.dtype} params: expected the params' dtype, or torch.float32 "
                             f"or torch.bfloat16 beside 16-bit and float32 params")


def _step_observed(opt: torch.optim.Optimizer) -> bool:
    """Whether a step hook is registered (on `opt` or globally) or the profiler is on."""
    return bool(opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks or _optimizer._global_optimizer_pre_hooks
                or _optimizer._global_optimizer_post_hooks or torch.autograd.profiler._is_profiler_enabled
                or torch._C._autograd._profiler_enabled())


def _as_float(x: Union[float, Tensor]) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def check_hyperparameters(lr: Union[float, Tensor], *checks: tuple[str, float]) -> None:
    """torch.optim's constructor checks with its messages, in the order given: a Tensor lr of one element,
    lr >= 0, then each (what, value) of `checks` >= 0 (ValueError "Invalid {what}: {value}")."""
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    for what, value in (("learning rate", lr),) + checks:
        if not 0.0 <= value:
            raise ValueError(f"Invalid {what}: {value}")


class _Bucket:
    """The tensors and groups of one op call: one device, dtype and set of call-wide flags."""

    def __init__(self, lists: tuple[str, ...]) -> None:
        self.lists: dict[str, list[Tensor]] = {name: [] for name in lists}
        self.groups: list[dict[str, Any]] = []
        self.group_sizes: list[int] = []
        #: per tensor, its _dtensor.norm_class (None: a plain tensor); None while the bucket holds no DTensor
        self.classes: Optional[list] = None


class FusedOptimizer(torch.optim.Optimizer):
    """Base of pyoptim's optimizers: one fused op call per bucket of (device, dtype, call-wide flags)."""

    # GradScaler hands grad_scale and found_inf to step() instead of unscaling
    # the grads itself; the kernels divide by the scale and skip inf steps.
    _step_supports_amp_scaling = True
    _op: str  # the functional op, e.g. "adam_step_"
    _check_args: Callable[..., None]  # its argument checks (pyoptim._validation)
    _lists: tuple[str, ...]  # the op's tensor lists, in order
    _torch_defaults: dict[str, Any]  # group keys torch's twin keeps, and their defaults

    # The update is elementwise, so one call over a flat buffer equals the
    # calls over its params (note [flat storage]); False where it is not (LAMB's per-tensor trust ratio).
    _supports_flat = True

    # Whether the op takes master_params / param_remainders / stochastic_seed and state of another dtype
    # (note [precision policy]).
    _supports_precision = False

    def __init__(self, params: Any, defaults: dict[str, Any], max_grad_norm: Optional[float],
                 backend: Optional[str], flat: bool = False, master_weights: Optional[str] = None,
                 state_dtype: Optional[torch.dtype] = None, stochastic_seed: int = 0) -> None:
        if backend is not None and backend not in _backends.BACKENDS:
            raise ValueError(f"pyoptim: unknown backend {backend!r}; expected one of {_backends.BACKENDS}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"Invalid max_grad_norm value: {max_grad_norm}")
        if defaults.get("differentiable"):
            raise RuntimeError(f"pyoptim.optim.{type(self).__name__} does not support differentiable=True "
                               f"(use torch.optim.{type(self).__name__})")
        if defaults.get("fused") and defaults.get("foreach"):
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        if flat and not self._supports_flat:
            raise ValueError(f"pyoptim.optim.{type(self).__name__} does not support flat=True")
        if flat and (master_weights is not None or state_dtype is not None):
            # Flat storage (note [flat storage], _flat.py) lays out the params, grads and the op's own state lists
            # as views of one buffer per (device, dtype); a policy's masters, remainders and step counters, and
            # state of another dtype than the params, have no place in those buffers yet.
            raise ValueError(f"pyoptim.optim.{type(self).__name__}: flat=True with master_weights={master_weights!r} "
                             f"/ state_dtype={state_dtype!r} is not supported: flat storage keeps params, grads and "
                             "state as views of one buffer per (device, dtype), with no room for fp32 masters, "
                             "remainders or state of another dtype; use flat=False with a precision policy")
        #: note [flat storage]: each group's params, grads and state as views of one buffer per (device, dtype)
        self.flat = bool(flat)
        self._flat_units: dict[int, FlatUnit] = {}  # id(param) -> its unit
        #: clip the grads' global L2 norm to this inside the step (None: no clip)
        self.max_grad_norm = max_grad_norm
        #: the grads' global L2 norm before clipping, of the last step (0-d tensor), when max_grad_norm is set
        self.grad_norm: Optional[Tensor] = None
        super().__init__(params, dict(defaults, backend=backend, master_weights=master_weights,
                                      state_dtype=state_dtype, stochastic_seed=stochastic_seed))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's add_param_group, except that a parameter listed twice in a group raises ValueError."""
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        if len({id(p) for p in params}) != len(params):
            # torch only warns, then updates the parameter twice per step.
            raise ValueError("optimizer contains a parameter group with duplicate parameters")
        super().add_param_group(param_group)
        check_precision_group(self.param_groups[-1], self._supports_precision, type(self).__name__)
        if self.__dict__.get("flat"):
            by_kind: dict[tuple, list[Tensor]] = {}
            for p in self.param_groups[-1]["params"]:
                if can_flatten(p) and id(p) not in self._flat_units:
                    by_kind.setdefault((p.device, p.dtype), []).append(p)
            for members in by_kind.values():
                unit = FlatUnit(members)
                self._flat_units.update(dict.fromkeys(map(id, members), unit))

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("max_grad_norm", None)
        self.__dict__.setdefault("grad_norm", None)
        self.__dict__.setdefault("flat", False)
        self.__dict__.setdefault("_flat_units", {})
        for group in self.param_groups:
            for key, value in self._torch_defaults.items():
                group.setdefault(key, value)
            group.setdefault("backend", None)
            for key in ("master_weights", "state_dtype"):
                group.setdefault(key, None)
            group.setdefault("stochastic_seed", 0)
            for p in group["params"]:
                st = self.state.get(p)
                if st and "step" in st:
                    st["step"] = self._step_tensor(st["step"], p)
                unit = self._flat_units.get(id(p))
                if st and unit is not None:
                    unit.rehome(p, st)  # loaded state into the flat buffers

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

    # -- the precision policy (note [precision policy]) -----------------------------

    def _zeros(self, p: Tensor, group: dict[str, Any]) -> Tensor:
        """A new per-element state tensor (a moment) of `p` in `group`'s state dtype."""
        return torch.zeros_like(p, dtype=state_dtype_of(group, p.dtype) if self._supports_precision else p.dtype,
                                memory_format=torch.preserve_format)

    @staticmethod
    def _policy_state(p: Tensor, policy: str) -> Tensor:
        """The extra state of a new param under `policy`: its fp32 master, or a zero remainder (p is exact)."""
        if policy == "fp32":
            return p.detach().to(torch.float32, memory_format=torch.preserve_format, copy=True)
        return torch.zeros_like(p, dtype=torch.int16, memory_format=torch.preserve_format)

    def _policy_lists(self, policy: Optional[str]) -> tuple[tuple[str, str], ...]:
        """(state key, op keyword) of the lists a step under `policy` passes beside the op's own: the masters or
        remainders; a subclass whose op keeps no step adds its stochastic step counters."""
        return (_POLICY_STATE[policy],) if policy in _POLICY_STATE else ()

    def _precision_key(self, group: dict[str, Any], dtype: torch.dtype) -> tuple:
        """(policy, its seed, state dtype) of the params of `dtype` in `group`: calls differ where these do (one
        policy and one state dtype per op call)."""
        if not self._supports_precision:
            return None, None, None
        policy = effective_policy(group, dtype)
        return policy, group["stochastic_seed"] if policy == "stochastic" else None, state_dtype_of(group, dtype)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load_state_dict, except that state keeps its dtype (note [checkpoint dtypes])."""
        # note [checkpoint dtypes]: torch casts every floating state tensor to its param's dtype, which would
        # round fp32 masters and moments to bf16. Here the moments take the group's state dtype (their saved
        # dtype when the checkpoint came from the same settings) and the masters convert between policies:
        #   to "fp32":        saved master; else param + saved remainder joined; else the param
        #   to "remainder":   saved remainder; else the saved master split (param = master rounded); else zero
        #   to None / "stochastic": the param takes a saved master rounded to nearest; extra state is dropped
        # The policy and state dtype are this optimizer's (what it was built with), whatever the checkpoint
        # held, as its backend is: loading converts. stochastic_seed is the checkpoint's where it has one, so
        # that a resumed run draws what the uninterrupted one would have.
        # (A group saved by torch.optim, without a backend, keeps this optimizer's too.)
        keys = ("master_weights", "state_dtype", "stochastic_seed", "backend")
        before = [{k: g.get(k) for k in keys} for g in self.param_groups]
        super().load_state_dict(state_dict)
        saved_state = state_dict["state"]
        for group, saved_group, was in zip(self.param_groups, state_dict["param_groups"], before):
            for k in keys:
                if k in ("master_weights", "state_dtype") or k not in saved_group:
                    group[k] = was[k]
            check_precision_group(group, self._supports_precision, type(self).__name__)
            if not self._supports_precision:
                continue
            for pid, p in zip(saved_group["params"], group["params"]):
                st = self.state.get(p)
                if st:
                    self._convert_state(p, group, st, saved_state.get(pid, {}))

    def _convert_state(self, p: Tensor, group: dict[str, Any], st: dict[str, Any], saved: dict[str, Any]) -> None:
        """A loaded param's state in its group's policy and state dtype (note [checkpoint dtypes])."""
        from pyoptim.reference import param_fp32, write_param

        policy = effective_policy(group, p.dtype)
        sd = state_dtype_of(group, p.dtype)
        for k, v in list(st.items()):
            src = saved.get(k, v)
            # torch's cast (to the param's dtype) stands where that is the state dtype (it may live in a
            # flat buffer by now); else the saved tensor, not torch's rounding of it, becomes the state.
            if k not in ("step", "master_param", "param_remainder") and isinstance(src, Tensor) \
                    and src.is_floating_point() and src.shape == p.shape and v.dtype != sd:
                st[k] = src.to(device=p.device, dtype=sd)
        master, rem = saved.get("master_param"), saved.get("param_remainder")
        st.pop("master_param", None)
        st.pop("param_remainder", None)
        with torch.no_grad():
            if master is not None:
                master = master.to(device=p.device, dtype=torch.float32)
            elif rem is not None:
                master = param_fp32(p, 0, None, [rem.to(p.device)])
            if policy == "fp32":
                st["master_param"] = master.clone() if master is not None else p.detach().float()
            elif policy == "remainder":
                out = torch.zeros_like(p, dtype=torch.int16)
                if master is not None:
                    write_param(p.data, 0, master, None, [out], None)
                st["param_remainder"] = out
            elif master is not None:
                p.data.copy_(master)
        for k, _ in self._policy_lists(policy):
            if k not in st:  # a policy's own counters (SGD's stochastic step) start afresh
                st[k] = self._new_state(p, group)[k]

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

    # note [sparse grads]: torch.optim's Adagrad and SGD take sparse grads (an
    # nn.Embedding(sparse=True)), on their for-loop path; a class that does
    # too defines _step_sparse, which steps those params with torch's own
    # functional step after the fused calls. _check_sparse raises torch's
    # errors (and ours: no fused clip, no L1 over sparse grads) before
    # anything is written.
    _step_sparse: Optional[Callable[..., None]] = None

    def _check_sparse(self, items: list[tuple[dict[str, Any], Tensor]]) -> None:
        """Raise, before any write, what the sparse step of these (group, param) pairs would raise."""
        if self.max_grad_norm is not None:
            raise RuntimeError(f"{type(self).__name__}: max_grad_norm does not support sparse gradients "
                               "(clip them with torch.nn.utils.clip_grad_norm_ first)")
        for group, p in items:
            if group["l1_weight_decay"] != 0:
                raise RuntimeError(f"{type(self).__name__}: l1_weight_decay does not support sparse gradients")
            if self.__dict__.get("flat") and id(p) in self._flat_units:
                raise RuntimeError(f"{type(self).__name__}: flat=True does not support sparse gradients")

    @staticmethod
    def _unscaled_sparse(items: list[tuple[dict[str, Any], Tensor]], grad_scale: Optional[Tensor],
                         found_inf: Optional[Tensor]) -> Optional[list[Tensor]]:
        """The items' sparse grads unscaled by GradScaler's grad_scale, or None where found_inf skips the step."""
        if found_inf is not None and bool(found_inf.item()):
            return None
        grads = [p.grad for _, p in items]
        if grad_scale is not None:
            inv = 1.0 / float(grad_scale.item())
            grads = [g * inv for g in grads]
        return grads

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's zero_grad; with flat storage and set_to_none=False, one fill per group's grad buffer."""
        if set_to_none or not self._flat_units:
            return super().zero_grad(set_to_none)
        units = {id(u): u for u in self._flat_units.values()}.values()
        done = {id(p) for u in units if u.zero_grads() for p in u.params}
        if len(done) == sum(len(g["params"]) for g in self.param_groups):
            return None
        for group in self.param_groups:  # the others as torch zeroes them
            for p in group["params"]:
                if id(p) not in done and p.grad is not None:
                    if p.grad.grad_fn is not None:
                        p.grad.detach_()
                    else:
                        p.grad.requires_grad_(False)
                    p.grad.zero_()
        return None

    # -- the step ------------------------------------------------------------------

    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """Perform a single optimization step."""
        # The steady-state step: torch's step wrapper (step hooks inside a
        # profiler range) and no_grad's decorator cost more than the plan's
        # whole step (~10 us); with no hook registered and no profiler
        # running they do nothing, so they are skipped.
        if (closure is None and not torch.compiler.is_compiling() and not _step_observed(self)
                and self.__dict__.get("_plan") is not None):
            grad_enabled = torch.is_grad_enabled()
            torch._C._set_grad_enabled(False)
            try:
                if self._run_plan(getattr(self, "grad_scale", None), getattr(self, "found_inf", None)):
                    return None
            finally:
                torch._C._set_grad_enabled(grad_enabled)
        return self._observed_step(closure)

    step.hooked = True  # torch.optim.Optimizer wraps a class's step unless so marked; _observed_step is wrapped

    @torch.optim.Optimizer.profile_hook_step
    @torch.no_grad()
    def _observed_step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """The step inside torch's step wrapper: step hooks, a profiler range."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale: Optional[Tensor] = getattr(self, "grad_scale", None)
        found_inf: Optional[Tensor] = getattr(self, "found_inf", None)
        if torch.compiler.is_compiling():
            self._compiled_step(grad_scale, found_inf)
            return loss
        if self._run_plan(grad_scale, found_inf):
            return loss

        buckets, calls, new_state, replayable = self._ordinary_step(grad_scale, found_inf)
        self._plan = (self._record_plan(buckets, calls, replayable)
                      if replayable is not None and not new_state and calls else None)
        return loss

    def _ordinary_step(self, grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> tuple:
        """The step by way of _gather: (buckets, calls, the state it made, what a plan needs: see _gather)."""
        buckets, new_state, replayable, sparse = self._gather()
        if sparse:
            self._check_sparse(sparse)
        calls = [self._call(key, b, grad_scale, found_inf) for key, b in buckets.items()]
        classes = [b.classes for b in buckets.values()]
        if self.max_grad_norm is not None and calls:
            self._fuse_clip(calls, grad_scale, classes)
        if len(calls) > 1:
            # note [exception safety]: each call checks its own arguments
            # before writing; with several calls, check them all before the
            # first one writes anything.
            for _, _, args, kwargs in calls:
                type(self)._check_args(*args, **kwargs)
        for call, cls in zip(calls, classes):
            self._run_call(call, cls)
        self.state.update(new_state)
        if sparse:
            self._step_sparse(sparse, grad_scale, found_inf)
        return buckets, calls, new_state, replayable

    def _gather(self, views: bool = True) -> tuple[dict[tuple, _Bucket], dict[Tensor, dict[str, Tensor]],
                                                   Optional[list], list[tuple[dict[str, Any], Tensor]]]:
        """Every param with a grad, in buckets of one device, dtype and set of call-wide flags; and new state.

        The fourth result lists the (group, param) pairs whose grads are sparse
        (note [sparse grads]), which no bucket holds.

        Within a bucket tensors stay ordered by param group and each group's
        hyperparameters ride along, so many groups still make one call. The
        third result, per bucket, lists its params and their state dicts when
        the step can be recorded as a plan (note [step plan]), else is None.
        With views=False (the compiled step's) complex tensors stay complex
        (their real views are the trace's) and DTensors are refused.
        """
        buckets: dict[tuple, _Bucket] = {}
        new_state: dict[Tensor, dict[str, Tensor]] = {}
        replayable: Optional[list] = []  # per bucket: (params, state dicts)
        sparse: list[tuple[dict[str, Any], Tensor]] = []
        state_of = self.state.get
        for group in self.param_groups:
            # Per group, not per param: this loop is the Python cost of a step
            # that has no plan.
            seen = set()
            keys = self._state_keys(group)
            flags = {False: self._call_flags(group, False), True: self._call_flags(group, True)}
            precision_of: dict[torch.dtype, tuple] = {}  # param dtype -> (policy, seed, state dtype)
            backend = group["backend"]
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    replayable = None  # a param without a grad: the next step may differ
                    continue
                if grad.is_sparse:
                    if self._step_sparse is None:
                        raise RuntimeError(self._sparse_message())
                    sparse.append((group, p))
                    replayable = None
                    continue
                state = state_of(p)
                fresh = not state
                precision = precision_of.get(p.dtype)
                if precision is None:
                    precision = precision_of[p.dtype] = self._precision_key(group, p.dtype)
                policy = precision[0]
                if fresh:
                    state = self._new_state(p, group)
                    if policy in _POLICY_STATE:
                        state[_POLICY_STATE[policy][0]] = self._policy_state(p, policy)
                    if state:
                        new_state[p] = state
                        unit = self._flat_units.get(id(p))
                        if unit is not None:
                            unit.rehome(p, state)
                elif policy in _POLICY_STATE and _POLICY_STATE[policy][0] not in state:
                    # State made before the first step (Adagrad's, at construction): the policy's master or
                    # remainder from the param as it is at its first step, committed with the step as new state is.
                    state = dict(state)
                    state[_POLICY_STATE[policy][0]] = self._policy_state(p, policy)
                    new_state[p] = state
                key = (p.device, p.dtype, backend, precision) + flags[fresh]
                bucket = buckets.get(key)
                if bucket is None:
                    bucket = buckets[key] = _Bucket(self._lists)
                    if replayable is not None:
                        replayable.append(([], []))
                if key not in seen:
                    seen.add(key)
                    bucket.groups.append(group)
                    bucket.group_sizes.append(0)
                bucket.group_sizes[-1] += 1
                lists = bucket.lists
                dist_class = None
                if type(p) not in _PLAIN:
                    replayable = None  # a tensor subclass (DTensor ...): the ordinary path only
                    if _dtensor.is_dtensor(p):
                        if not views:
                            raise NotImplementedError(f"pyoptim.optim.{type(self).__name__}: a compiled step over "
                                                      "DTensor params; call step() outside torch.compile")
                        # note [DTensor by unwrapping] (pyoptim/_dtensor.py): the op runs on the local shards.
                        dist_class = _dtensor.norm_class(p)
                        p, grad = _dtensor.local_param_and_grad(p, grad, type(self).__name__)
                        state = {k: _dtensor.local(v) for k, v in state.items()}
                        if bucket.classes is None:
                            bucket.classes = [None] * len(lists["params"])
                if bucket.classes is not None:
                    bucket.classes.append(dist_class)
                if p.is_complex() and views:  # as torch: the update of a complex param is that of its real view
                    replayable = None
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
                    for k, name in self._policy_lists(policy):
                        lists.setdefault(name, []).append(state[k])
                    if replayable is not None:
                        entry = replayable[list(buckets).index(key)]
                        entry[0].append(p)
                        entry[1].append(state)
        return buckets, new_state, replayable, sparse

    # -- the compiled step (note [compiled step]) ----------------------------------------
    #
    # note [compiled step]: under torch.compile the step is traced, but not
    # its gathering: dynamo's OptimizerVariable runs a method named
    # `_init_group` eagerly (as it does torch's optimizers' own), then hands
    # the tensors that call put in an empty list to the trace as the graph's
    # inputs they are (params, their grads, state tensors) and guards the
    # param groups and the state. _init_group makes the first step's state
    # and lays every bucket's tensors out in one list, returning the layout
    # as constants; the trace slices the list, reads the hyperparameters
    # (the lr as a tensor: note [compiled lr]) and calls the ops, so a
    # compiled step is one graph that later steps reuse.

    def _init_group(self, tensors: list) -> tuple:
        """Make the state of params stepped for the first time; append every bucket's tensors (params, grads and
        state lists, in the op's order) to `tensors`; return the buckets' layout as constants."""
        buckets, new_state, _, sparse = self._gather(views=False)
        if sparse:  # note [sparse grads]: torch's for-loop update, which the trace does not take
            raise RuntimeError(f"{type(self).__name__}: sparse gradients are not supported under torch.compile")
        self.state.update(new_state)
        index = {id(g): i for i, g in enumerate(self.param_groups)}
        layout = []
        for key, b in buckets.items():
            counts = tuple(len(b.lists[name]) for name in self._lists)
            for name in self._lists:
                tensors.extend(b.lists[name])
            # key: (device, dtype, backend, precision) + the call's flags (_gather's).
            layout.append((key[2], tuple(key[4:]), tuple(index[id(g)] for g in b.groups), tuple(b.group_sizes),
                           counts))
        return tuple(layout)

    def _compiled_step(self, grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
        """The step as torch.compile traces it (note [compiled step])."""
        if self._first_call_differs() or self._has_precision_policy():
            # Dynamo guards the state as _init_group leaves it, so a layout
            # that holds a first step's flags (SGD's is_first_step) would be
            # replayed on the later steps: that step runs eagerly instead.
            self._eager_step(grad_scale, found_inf)
            return
        tensors: list[Tensor] = []
        layout = self._init_group(tensors)
        calls = []
        pos = 0
        for backend, flags, group_indices, group_sizes, counts in layout:
            args = []
            for count in counts:
                args.append([torch.view_as_real(t) if t.is_complex() else t for t in tensors[pos:pos + count]])
                pos += count
            groups = [self.param_groups[i] for i in group_indices]
            kwargs = self._step_kwargs(args[0][0].device, flags, groups, grad_scale, found_inf)
            kwargs["group_sizes"] = list(group_sizes)
            calls.append((self._op, backend, tuple(args), kwargs))
        if self.max_grad_norm is not None and calls:
            self._fuse_clip(calls, grad_scale, [None] * len(calls))
        for call in calls:
            op, backend, args, _ = call
            if functional.traced_by_compile(op, args[0][0].device.type, backend):
                self._run_call(call, None)
            else:
                # The reference's steps, and the Triton launchers where the
                # library is not loaded (note [triton step ops]), are no
                # dispatcher ops: dynamo cannot trace the Triton
                # interpreter's launch (it fails inside
                # triton.runtime.interpreter), so such a call runs eagerly, a
                # graph break, with the values the trace made.
                self._eager_call(call)

    @torch.compiler.disable
    def _eager_call(self, call: tuple) -> None:
        """One op call of a compiled step, outside the trace (a graph break)."""
        self._run_call(call, None)

    def _has_precision_policy(self) -> bool:
        """Whether a group keeps masters or rounds stochastically: the compiled step does not trace those lists
        (note [precision policy]); such a step runs eagerly."""
        return any(g.get("master_weights") is not None for g in self.param_groups)

    def _first_call_differs(self) -> bool:
        """Whether a param with a grad has no state yet in a group whose first step's call flags differ."""
        for g in self.param_groups:
            if self._call_flags(g, True) != self._call_flags(g, False):
                if any(p.grad is not None and not self.state.get(p) for p in g["params"]):
                    return True
        return False

    @torch.compiler.disable
    def _eager_step(self, grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
        """The ordinary step, outside the trace (a graph break)."""
        self._ordinary_step(grad_scale, found_inf)

    # -- the step plan (note [step plan] in csrc/step_plan.cpp) -------------------------

    def _plan_signature(self) -> tuple:
        """What a recorded plan depends on besides the params and state it checks itself: the groups' structure,
        backend and flags, the clip, and the backend the environment asks for."""
        return (os.environ.get("PYOPTIM_BACKEND"), self.max_grad_norm is None, tuple(
            (id(g["params"]), g["backend"], self._call_flags(g, False)) for g in self.param_groups))

    def _record_plan(self, buckets: dict[tuple, _Bucket], calls: list, replayable: list) -> Optional[tuple]:
        """The plan of this step's calls, or None where it cannot be replayed in C++.

        With flat storage, the params of a unit that is wholly in place
        (note [flat storage]) become one entry of the recorded call: its buffers.
        """
        if not _backends.EXTENSION_LOADED or torch.compiler.is_compiling():
            return None
        for op, backend, args, _ in calls:
            if _backends.select(op, args[0][0].device, backend) not in _DISPATCHED:
                return None
        from pyoptim import _C

        cpp = _C.StepPlan(self.state)
        cpp.set_groups([g["params"] for g in self.param_groups])
        metas = []
        for (key, b), (op, _, args, kwargs), (params, states) in zip(buckets.items(), calls, replayable):
            lists = {name: [] for name in self._lists}
            members, group_sizes = [], []
            flat_ok: dict[int, bool] = {}  # id(unit) -> served as one entry
            flat_done: set[int] = set()
            i = 0
            for group, size in zip(b.groups, b.group_sizes):
                state_keys = self._state_keys(group)
                entries = 0
                for p, st in zip(params[i:i + size], states[i:i + size]):
                    unit = self._flat_units.get(id(p))
                    if unit is not None and id(unit) in flat_done:
                        members.append(None)
                        cpp.add_member(p, st, unit.grad_slot(unit.index[id(p)]))
                        continue
                    if unit is not None and flat_ok.setdefault(id(unit), self._unit_in_call(unit, params, state_keys)):
                        flat_done.add(id(unit))
                        cpp.add_member(p, st, unit.grad_slot(unit.index[id(p)]))
                        for name, t in unit.call_entries(state_keys).items():
                            lists[name].append(t)
                        members.append(-1)
                        if unit.steps is not None:
                            cpp.add_step_sync(unit.steps)
                    else:
                        members.append(cpp.add_member(p, st))
                        lists["params"].append(p)
                        lists["grads"].append(p.grad)
                        for name, k in state_keys:
                            lists[name].append(st[k])
                    entries += 1
                group_sizes.append(entries)
                i += size
            grad_members = [m for m in members if m is not None]
            call_kwargs = dict(kwargs, group_sizes=group_sizes)
            cpp.add_call(f"pyoptim::{op}", tuple(lists[name] for name in self._lists), call_kwargs, "grads",
                         grad_members, [k for k in kwargs if k not in _RECORDED])
            metas.append((key[0], key[4:], b.groups))
        return self._plan_signature(), cpp, metas

    def _unit_in_call(self, unit: FlatUnit, params: list[Tensor], state_keys) -> bool:
        """Every param of `unit` is in this call and in place in the unit's buffers."""
        in_call = {id(p) for p in params}
        return all(id(p) in in_call for p in unit.params) and unit.in_place(self.state.get, [k for _, k in state_keys])

    def _run_plan(self, grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> bool:
        """The step by the recorded plan; False (nothing written) when there is none or it no longer applies."""
        plan = self.__dict__.get("_plan")
        if plan is None or torch.compiler.is_compiling():
            return False
        signature, cpp, metas = plan
        if signature != self._plan_signature():
            return False
        kwargs = [self._step_kwargs(device, flags, groups, grad_scale, found_inf) for device, flags, groups in metas]
        if len(kwargs) > 1:
            # note [exception safety]: the ops check the hyperparameters each
            # call; with several calls, check every call's first (with no
            # tensors, a check costs nothing per tensor).
            for (_, _, groups), kw in zip(metas, kwargs):
                type(self)._check_args(*([] for _ in self._lists), **kw, group_sizes=[0] * len(groups))
        ok, total = cpp.run([g["params"] for g in self.param_groups], self.state, kwargs, self.max_grad_norm)
        if not ok:
            self._plan = None
            return False
        if total is not None:
            self.grad_norm = self._unscaled_norm(total, grad_scale)
        return True

    def _call(self, key: tuple, b: _Bucket, grad_scale: Optional[Tensor], found_inf: Optional[Tensor]):
        args = tuple(b.lists[name] for name in self._lists)
        kwargs = self._step_kwargs(key[0], key[4:], b.groups, grad_scale, found_inf)
        kwargs["group_sizes"] = b.group_sizes
        policy, seed, _ = key[3]
        for _, name in self._policy_lists(policy):
            kwargs[name] = b.lists[name]
        if policy == "stochastic":
            kwargs["stochastic_seed"] = seed
        return self._op, key[2], args, kwargs

    def _step_kwargs(self, device: torch.device, flags: tuple, groups: list[dict[str, Any]],
                     grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> dict[str, Any]:
        """The op's keywords that may change from step to step: the groups' hyperparameters and GradScaler's."""
        lrs = [g["lr"] for g in groups]
        lr_tensor = None
        # note [compiled lr]: under torch.compile the lr is read as a tensor
        # on the device, float or Tensor alike: a float the compiler treats as
        # a changing input (an LR scheduler's) then needs no guard on its
        # value, and a Tensor lr no .item() (a graph break), so a compiled
        # step is not recompiled when the lr moves.
        if torch.compiler.is_compiling() or (device.type != "cpu" and any(
                isinstance(lr, Tensor) and lr.device.type != "cpu" for lr in lrs)):
            # Read lr on the device (capturable, no host sync): one float64
            # value per group (exact for float32 and float64 lr tensors).
            # A float lr enters as `zeros + lr`: arithmetic the compiler keeps
            # symbolic (a torch.full of it would be specialized to its value).
            lr_tensor = torch.stack([
                lr.reshape(()).to(device=device, dtype=torch.float64) if isinstance(lr, Tensor)
                else torch.zeros((), dtype=torch.float64, device=device) + lr
                for lr in lrs
            ])
            lr_floats = [0.0] * len(lrs)
        else:
            lr_floats = [_as_float(lr) for lr in lrs]
        if grad_scale is not None and grad_scale.device != device:
            grad_scale = grad_scale.to(device, non_blocking=True)
        if found_inf is not None and found_inf.device != device:
            found_inf = found_inf.to(device, non_blocking=True)
        return dict(self._call_kwargs(flags, groups), lr=lr_floats, lr_tensor=lr_tensor, grad_scale=grad_scale,
                    found_inf=found_inf)

    @staticmethod
    def _unscaled_norm(total: Tensor, grad_scale: Optional[Tensor]) -> Tensor:
        """The norm of the unscaled grads, from that of the grads as GradScaler scaled them."""
        if grad_scale is None:
            return total
        return total * grad_scale.double().reciprocal().float().to(total.device)

    def _run_call(self, call: tuple, classes: Optional[list]) -> None:
        """One op call of the step; `classes` (the bucket's) says which tensors are DTensor shards (LAMB's
        per-tensor norms need them: note [DTensor by unwrapping])."""
        op, backend, args, kwargs = call
        getattr(functional, op)(*args, **kwargs, backend=backend)

    def _fuse_clip(self, calls: list, grad_scale: Optional[Tensor], classes: list) -> None:
        """One norm pass over all grads; the clip factor is applied inside each step kernel."""
        totals: dict[Any, list[Tensor]] = {}  # norm class -> the local norms of its tensors, per call
        for (_, backend, args, _), cls in zip(calls, classes):
            grads = args[1]
            norm_backend = backend if backend in _backends.available("multi_tensor_norm", grads[0].device.type) \
                else None
            for key, members in _by_class(grads, cls).items():
                totals.setdefault(key, []).append(functional.multi_tensor_norm(members, 2.0,
                                                                               backend=norm_backend)[0])
        device0 = calls[0][2][0][0].device

        def combined(parts: list[Tensor]) -> Tensor:
            return parts[0] if len(parts) == 1 else torch.linalg.vector_norm(
                torch.stack([t.to(device0, non_blocking=True) for t in parts]))

        if list(totals) == [None]:
            total = combined(totals[None])
        else:  # DTensor shards: their partial norms reduced across their meshes
            total = _dtensor.global_norm({k: combined(v).to(device0) for k, v in totals.items()}, 2.0)
        for _, _, args, kwargs in calls:
            kwargs["grad_norm"] = total if total.device == args[0][0].device else total.to(args[0][0].device)
            kwargs["max_grad_norm"] = float(self.max_grad_norm)
        self.grad_norm = self._unscaled_norm(total, grad_scale)


def _by_class(tensors: list[Tensor], classes: Optional[list]) -> dict[Any, list[Tensor]]:
    """`tensors` by their norm class (pyoptim/_dtensor.py's; None for every tensor when `classes` is None)."""
    if classes is None:
        return {None: tensors}
    out: dict[Any, list[Tensor]] = {}
    for t, c in zip(tensors, classes):
        out.setdefault(c, []).append(t)
    return out
