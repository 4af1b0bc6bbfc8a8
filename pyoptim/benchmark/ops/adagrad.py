"""Adagrad's step: pyoptim's backends against torch's for-loop, foreach and fused Adagrad, apex and DeepSpeed.

One timed call is one optimizer.step() with every .grad already set. Bytes an
fp32 step must move: 20 per parameter (p, g, sum read; p, sum written), in
general 5 times the element size. A pyoptim without Adagrad (it lands with
adagrad_step_) leaves its providers unavailable, and torch's still run.

Run on its own: python benchmarks/run.py --ops adagrad [options].
"""

from __future__ import annotations

import argparse

from pyoptim.benchmark.harness import Case, Provider, missing_module
from pyoptim.benchmark.ops.adam import _step_of, optimizer_providers, param_list_op, torch_providers

LR, LR_DECAY, WEIGHT_DECAY = 1e-2, 1e-4, 1e-2


def bytes_moved(case: Case, dtype, opts: argparse.Namespace) -> int:
    """5 tensors' worth per element: p, g, sum read; p, sum written."""
    import torch

    return case.numel * torch.empty((), dtype=dtype).element_size() * 5


def providers(device, opts: argparse.Namespace) -> list[Provider]:
    """pyoptim's backends for the device, torch's three Adagrads, and apex / DeepSpeed where importable."""
    import torch

    import pyoptim

    hp = dict(lr=LR, lr_decay=LR_DECAY, weight_decay=WEIGHT_DECAY)
    out = optimizer_providers("adagrad_step_", device, lambda ps, **kw: pyoptim.optim.Adagrad(ps, **hp, **kw))
    out += torch_providers(lambda ps, **kw: torch.optim.Adagrad(ps, **hp, **kw))
    if device.type == "cuda":
        def apex_adagrad(ps):  # no lr_decay: its step is otherwise the same
            from apex.optimizers import FusedAdagrad
            return FusedAdagrad(ps, lr=LR, weight_decay=WEIGHT_DECAY)

        out.append(Provider("apex-fused", "peer", _step_of(apex_adagrad), unavailable=missing_module("apex")))
    else:
        def ds_cpu_adagrad(ps):  # no lr_decay: its step is otherwise the same
            from deepspeed.ops.adagrad import DeepSpeedCPUAdagrad
            return DeepSpeedCPUAdagrad(ps, lr=LR, weight_decay=WEIGHT_DECAY)

        out.append(Provider("deepspeed-cpu", "peer", _step_of(ds_cpu_adagrad), unavailable=missing_module("deepspeed")))
    return out


OP = param_list_op(
    name="adagrad",
    description=f"Adagrad step (lr={LR}, lr_decay={LR_DECAY}, weight_decay={WEIGHT_DECAY}), one optimizer.step()",
    bytes_moved=bytes_moved,
    providers=providers,
    baseline="torch-fused",
    settings=lambda opts: {"optimizer": "Adagrad", "lr": LR, "lr_decay": LR_DECAY, "weight_decay": WEIGHT_DECAY},
    api="pyoptim.optim.Adagrad",
    torch_api="torch.optim.Adagrad",
)
