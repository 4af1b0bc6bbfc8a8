"""AdamW's step: pyoptim's backends against torch's for-loop, foreach and fused AdamW, apex and DeepSpeed.

One timed call is one optimizer.step() with every .grad already set. Bytes an
fp32 step must move: 28 per parameter (p, g, exp_avg, exp_avg_sq read; p,
exp_avg, exp_avg_sq written), 36 with amsgrad (max_exp_avg_sq read and
written); in general 7 (or 9) times the element size.

Run on its own: python benchmarks/run.py --ops adam [options]; on your own shapes:
python -m pyoptim.benchmark --ops adam --model resnet50.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

from pyoptim.benchmark.harness import PARAM_CASES, Case, Op, Provider, missing_module, pyoptim_providers

LR, WEIGHT_DECAY = 1e-3, 1e-2


def make_inputs(case: Case, device, dtype, opts: argparse.Namespace) -> tuple[list, list]:
    """Params and grads for `case` (random normal); each provider steps its own copies."""
    import torch

    g = torch.Generator(device=device).manual_seed(0)
    n = case.numel
    flat_p = torch.randn(n, generator=g, device=device, dtype=dtype)
    flat_g = torch.randn(n, generator=g, device=device, dtype=dtype)
    sizes = [s.numel() for s in (torch.Size(sh) for sh in case.shapes)]
    params = [t.view(sh) for t, sh in zip(flat_p.split(sizes), case.shapes)]
    grads = [t.view(sh) for t, sh in zip(flat_g.split(sizes), case.shapes)]
    return params, grads


def bytes_moved(case: Case, dtype, opts: argparse.Namespace) -> int:
    """7 tensors' worth per element (p, g, m, v read; p, m, v written), 9 with amsgrad."""
    import torch

    itemsize = torch.empty((), dtype=dtype).element_size()
    return case.numel * itemsize * (9 if opts.amsgrad else 7)


def _params(inputs: tuple[list, list]) -> list:
    """Fresh leaf params (their own storage) with .grad set."""
    params0, grads0 = inputs
    params = [p.clone().requires_grad_(True) for p in params0]
    for p, g in zip(params, grads0):
        p.grad = g.clone()
    return params


def _step_of(make_optimizer: Callable[[list], Any]) -> Callable[[tuple[list, list]], Callable[[], Any]]:
    return lambda inputs: make_optimizer(_params(inputs)).step


# The torch implementations every optimizer benchmark compares against: (name, constructor kwargs, foreach).
TORCH_VARIANTS = (("forloop", dict(foreach=False), False), ("foreach", dict(foreach=True), True),
                  ("fused", dict(fused=True), True))


def torch_providers(make_optimizer: Callable[..., Any], step_of=None,
                    variants: tuple[str, ...] = ("forloop", "foreach", "fused")) -> list[Provider]:
    """torch-forloop, torch-foreach and torch-fused (those of `variants`: an optimizer torch has no fused version
    of leaves it out): `make_optimizer(params, **kwargs)` stepped by `step_of` (default _step_of; called as
    step_of(make, foreach) when given)."""
    out = []
    for name, kw, foreach in (v for v in TORCH_VARIANTS if v[0] in variants):
        make = lambda ps, kw=kw: make_optimizer(ps, **kw)  # noqa: E731
        out.append(Provider(f"torch-{name}", "torch", _step_of(make) if step_of is None else step_of(make, foreach)))
    return out


def optimizer_providers(op: str, device, make_optimizer: Callable[..., Any]) -> list[Provider]:
    """pyoptim's providers of an optimizer that supports flat storage: `make_optimizer(params, backend=...)` for
    each backend (pyoptim-<backend>), and with flat=True (pyoptim-<backend>-flat: the step over one buffer)."""
    return pyoptim_providers(op, device, lambda b: _step_of(lambda ps: make_optimizer(ps, backend=b)),
                             flat_setup_for=lambda b: _step_of(lambda ps: make_optimizer(ps, backend=b, flat=True)))


def param_list_op(**kw: Any) -> Op:
    """An Op over a model's parameter list (PARAM_CASES, params and grads from make_inputs), default cases
    large, many_small and transformer; `kw` are the rest of Op's fields."""
    return Op(cases=PARAM_CASES, default_cases=("large", "many_small", "transformer"), make_inputs=make_inputs, **kw)


def providers(device, opts: argparse.Namespace) -> list[Provider]:
    """pyoptim's backends for the device, torch's three AdamWs, and apex / DeepSpeed where importable."""
    import torch

    import pyoptim

    hp = dict(lr=LR, weight_decay=WEIGHT_DECAY, amsgrad=opts.amsgrad)
    out = optimizer_providers("adam_step_", device, lambda ps, **kw: pyoptim.optim.AdamW(ps, **hp, **kw))
    out += torch_providers(lambda ps, **kw: torch.optim.AdamW(ps, **hp, **kw))

    if device.type == "cuda":
        def apex_adam(ps):
            from apex.optimizers import FusedAdam
            return FusedAdam(ps, **hp, adam_w_mode=True)

        def ds_adam(ps):
            from deepspeed.ops.adam import FusedAdam
            return FusedAdam(ps, **hp, adam_w_mode=True)

        out.append(Provider("apex-fused", "peer", _step_of(apex_adam), unavailable=missing_module("apex")))
        out.append(Provider("deepspeed-fused", "peer", _step_of(ds_adam), unavailable=missing_module("deepspeed")))
    else:
        def ds_cpu_adam(ps):
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            return DeepSpeedCPUAdam(ps, **hp, adamw_mode=True)

        out.append(Provider("deepspeed-cpu", "peer", _step_of(ds_cpu_adam), unavailable=missing_module("deepspeed")))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--amsgrad."""
    parser.add_argument("--amsgrad", action="store_true", help="adam: amsgrad=True (36 bytes per fp32 param)")


OP = param_list_op(
    name="adam",
    description=f"AdamW step (lr={LR}, weight_decay={WEIGHT_DECAY}), one optimizer.step() with grads set",
    bytes_moved=bytes_moved,
    providers=providers,
    baseline="torch-fused",
    add_arguments=add_arguments,
    settings=lambda opts: {"optimizer": "AdamW", "lr": LR, "weight_decay": WEIGHT_DECAY, "betas": (0.9, 0.999),
                           "eps": 1e-8, "amsgrad": opts.amsgrad},
    api="pyoptim.optim.AdamW",
    torch_api="torch.optim.AdamW",
)
