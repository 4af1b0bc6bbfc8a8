"""Clip + AdamW step: pyoptim's AdamW(max_grad_norm=...) against torch's clip_grad_norm_ then AdamW.

Ours reads the grads once for the norm and applies the clip factor inside the
step kernel (grads untouched): 32 bytes per fp32 parameter, the floor of this
work, which is what GB/s is computed from for every implementation. torch's
two calls move 40 (a norm pass, a scale pass, the step).

Run on its own: python benchmarks/run.py --ops clip_adamw [options].
"""

from __future__ import annotations

import argparse

from pyoptim.benchmark.ops.adam import LR, WEIGHT_DECAY, _params, optimizer_providers, param_list_op, torch_providers
from pyoptim.benchmark.harness import Case, Provider

MAX_NORM = 1e-3


def bytes_moved(case: Case, dtype, opts: argparse.Namespace) -> int:
    """8 tensors' worth per element: g read for the norm, then the step's 7."""
    import torch

    return case.numel * torch.empty((), dtype=dtype).element_size() * 8


def _torch_clip_step(make_optimizer, foreach):
    import torch

    def setup(inputs):
        params = _params(inputs)
        opt = make_optimizer(params)

        def call():
            torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=foreach)
            opt.step()
        return call
    return setup


def providers(device, opts: argparse.Namespace) -> list[Provider]:
    """pyoptim's fused clip for each backend; torch's clip_grad_norm_ + AdamW for-loop, foreach and fused."""
    import torch

    import pyoptim

    hp = dict(lr=LR, weight_decay=WEIGHT_DECAY)
    out = optimizer_providers("adam_step_", device,
                              lambda ps, **kw: pyoptim.optim.AdamW(ps, **hp, max_grad_norm=MAX_NORM, **kw))
    return out + torch_providers(lambda ps, **kw: torch.optim.AdamW(ps, **hp, **kw), _torch_clip_step)


OP = param_list_op(
    name="clip_adamw",
    description=f"clip to max_norm={MAX_NORM} + AdamW step: fused (pyoptim) against clip_grad_norm_ then step",
    bytes_moved=bytes_moved,
    providers=providers,
    baseline="torch-fused",
    settings=lambda opts: {"optimizer": "AdamW", "lr": LR, "weight_decay": WEIGHT_DECAY, "max_grad_norm": MAX_NORM},
    api="pyoptim.optim.AdamW(..., max_grad_norm=...)",
    torch_api="torch.nn.utils.clip_grad_norm_ + torch.optim.AdamW",
)
