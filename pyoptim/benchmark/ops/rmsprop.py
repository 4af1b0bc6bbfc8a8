"""RMSprop's step: pyoptim's backends against torch's for-loop and foreach RMSprop (torch has no fused one).

One timed call is one optimizer.step() with every .grad already set. Bytes an
fp32 step must move, with momentum and centered (the default here, the
heaviest): 36 per parameter (p, g, square_avg, grad_avg, momentum_buffer
read; p and the three states written), in general 9 times the element size;
--plain drops both (20 bytes: p, g, square_avg read; p, square_avg written).
A pyoptim without RMSprop (it lands with rmsprop_step_) leaves its providers
unavailable, and torch's still run.

Run on its own: python benchmarks/run.py --ops rmsprop [options].
"""

from __future__ import annotations

import argparse

from pyoptim.benchmark.harness import Case, Provider
from pyoptim.benchmark.ops.adam import optimizer_providers, param_list_op, torch_providers

LR, ALPHA, MOMENTUM, WEIGHT_DECAY = 1e-3, 0.99, 0.9, 1e-2


def _hyper(opts: argparse.Namespace) -> dict:
    plain = getattr(opts, "plain", False)
    return dict(lr=LR, alpha=ALPHA, weight_decay=WEIGHT_DECAY, momentum=0.0 if plain else MOMENTUM,
                centered=not plain)


def bytes_moved(case: Case, dtype, opts: argparse.Namespace) -> int:
    """9 tensors' worth per element with momentum and centered (p, g, square_avg, grad_avg, buf read; all but g
    written), 5 with --plain."""
    import torch

    itemsize = torch.empty((), dtype=dtype).element_size()
    return case.numel * itemsize * (5 if getattr(opts, "plain", False) else 9)


def providers(device, opts: argparse.Namespace) -> list[Provider]:
    """pyoptim's backends for the device and torch's for-loop and foreach RMSprop."""
    import torch

    import pyoptim

    hp = _hyper(opts)
    out = optimizer_providers("rmsprop_step_", device, lambda ps, **kw: pyoptim.optim.RMSprop(ps, **hp, **kw))
    return out + torch_providers(lambda ps, **kw: torch.optim.RMSprop(ps, **hp, **kw),
                                 variants=("forloop", "foreach"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--plain."""
    parser.add_argument("--plain", action="store_true",
                        help="rmsprop: momentum=0 and centered=False (20 bytes per fp32 param, not 36)")


OP = param_list_op(
    name="rmsprop",
    description=f"RMSprop step (lr={LR}, alpha={ALPHA}, momentum={MOMENTUM}, centered, weight_decay={WEIGHT_DECAY}),"
                " one optimizer.step()",
    bytes_moved=bytes_moved,
    providers=providers,
    baseline="torch-foreach",
    add_arguments=add_arguments,
    settings=lambda opts: dict(_hyper(opts), optimizer="RMSprop"),
    api="pyoptim.optim.RMSprop",
    torch_api="torch.optim.RMSprop",
)
