"""SGD with momentum: pyoptim's backends against torch's for-loop, foreach and fused SGD.

One timed call is one optimizer.step() with every .grad already set. Bytes an
fp32 step must move: 20 per parameter (p, g, momentum_buffer read; p,
momentum_buffer written), in general 5 times the element size.

Run on its own: python benchmarks/run.py --ops sgd [options].
"""

from __future__ import annotations

import argparse

from pyoptim.benchmark.ops.adam import optimizer_providers, param_list_op, torch_providers
from pyoptim.benchmark.harness import Case, Provider

LR, MOMENTUM, WEIGHT_DECAY = 1e-2, 0.9, 1e-4


def bytes_moved(case: Case, dtype, opts: argparse.Namespace) -> int:
    """5 tensors' worth per element: p, g, buf read; p, buf written."""
    import torch

    return case.numel * torch.empty((), dtype=dtype).element_size() * 5


def providers(device, opts: argparse.Namespace) -> list[Provider]:
    """pyoptim's backends for the device and torch's three SGDs."""
    import torch

    import pyoptim

    hp = dict(lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    out = optimizer_providers("sgd_step_", device, lambda ps, **kw: pyoptim.optim.SGD(ps, **hp, **kw))
    return out + torch_providers(lambda ps, **kw: torch.optim.SGD(ps, **hp, **kw))


OP = param_list_op(
    name="sgd",
    description=f"SGD step (lr={LR}, momentum={MOMENTUM}, weight_decay={WEIGHT_DECAY}), one optimizer.step()",
    bytes_moved=bytes_moved,
    providers=providers,
    baseline="torch-fused",
    settings=lambda opts: {"optimizer": "SGD", "lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY},
    api="pyoptim.optim.SGD",
    torch_api="torch.optim.SGD",
)
