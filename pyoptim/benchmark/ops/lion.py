"""Lion's step: pyoptim's backends against Lion as a user writes it in torch (for-loop and foreach) and lion-pytorch.

torch has no Lion: the two torch providers are the update of the paper
written with torch ops, one tensor at a time and with torch._foreach_* over
the list, as a user would. One timed call is one optimizer.step() with every
.grad already set. Bytes an fp32 step must move: 20 per parameter (p, g,
exp_avg read; p, exp_avg written), in general 5 times the element size.

Run on its own: python benchmarks/run.py --ops lion [options].
"""

from __future__ import annotations

import argparse

from pyoptim.benchmark.ops.adam import _step_of, optimizer_providers, param_list_op
from pyoptim.benchmark.harness import Case, Provider, missing_module

LR, BETAS, WEIGHT_DECAY = 1e-4, (0.9, 0.99), 1e-2


def bytes_moved(case: Case, dtype, opts: argparse.Namespace) -> int:
    """5 tensors' worth per element: p, g, m read; p, m written."""
    import torch

    return case.numel * torch.empty((), dtype=dtype).element_size() * 5


def torch_lion(foreach: bool):
    """Lion in torch ops, as a user writes it: p *= 1 - lr * wd; p -= lr * sign(b1 m + (1 - b1) g); m = lerp."""
    import torch

    class TorchLion(torch.optim.Optimizer):
        def __init__(self, params, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY):
            super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

        @torch.no_grad()
        def step(self):
            for group in self.param_groups:
                lr, (b1, b2), wd = group["lr"], group["betas"], group["weight_decay"]
                ps = [p for p in group["params"] if p.grad is not None]
                gs = [p.grad for p in ps]
                ms = [self.state[p].setdefault("exp_avg", torch.zeros_like(p)) for p in ps]
                if foreach:
                    torch._foreach_mul_(ps, 1 - lr * wd)
                    update = torch._foreach_mul(ms, b1)
                    torch._foreach_add_(update, gs, alpha=1 - b1)
                    torch._foreach_sign_(update)
                    torch._foreach_add_(ps, update, alpha=-lr)
                    torch._foreach_mul_(ms, b2)
                    torch._foreach_add_(ms, gs, alpha=1 - b2)
                else:
                    for p, g, m in zip(ps, gs, ms):
                        p.mul_(1 - lr * wd)
                        p.add_(m.mul(b1).add_(g, alpha=1 - b1).sign_(), alpha=-lr)
                        m.mul_(b2).add_(g, alpha=1 - b2)

    return TorchLion


def providers(device, opts: argparse.Namespace) -> list[Provider]:
    """pyoptim's backends for the device, Lion in torch (for-loop, foreach) and lion-pytorch where importable."""
    import pyoptim

    hp = dict(lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)
    out = optimizer_providers("lion_step_", device, lambda ps, **kw: pyoptim.optim.Lion(ps, **hp, **kw))
    out += [Provider("torch-forloop", "torch", _step_of(lambda ps: torch_lion(False)(ps, **hp))),
            Provider("torch-foreach", "torch", _step_of(lambda ps: torch_lion(True)(ps, **hp)))]

    def lion_pytorch(ps):
        from lion_pytorch import Lion
        return Lion(ps, **hp)

    out.append(Provider("lion-pytorch", "peer", _step_of(lion_pytorch), unavailable=missing_module("lion_pytorch")))
    return out


OP = param_list_op(
    name="lion",
    description=f"Lion step (lr={LR}, betas={BETAS}, weight_decay={WEIGHT_DECAY}), one optimizer.step()",
    bytes_moved=bytes_moved,
    providers=providers,
    baseline="torch-foreach",
    settings=lambda opts: {"optimizer": "Lion", "lr": LR, "betas": BETAS, "weight_decay": WEIGHT_DECAY},
    api="pyoptim.optim.Lion",
)
