"""LAMB's step: pyoptim's backends against LAMB as a user writes it in torch (for-loop and foreach).

torch has no LAMB: the two torch providers are the paper's update (Adam's
moments with bias correction, u = m_hat / (sqrt(v_hat) + eps) + wd * p, the
per-tensor trust ratio ||p|| / ||u||) written with torch ops, one tensor at a
time and with torch._foreach_* (torch._foreach_norm for the norms) over the
list, as a user would. One timed call is one optimizer.step() with every
.grad already set.

Bytes an fp32 step must move: the update's 28 per parameter (p, g, m, v read;
p, m, v written) plus what the norms cost: u's norm is known only after
every element of u is, so the step reads p, m and v a second time (12 more),
40 in all; in general 10 times the element size.

Run on its own: python benchmarks/run.py --ops lamb [options].
"""

from __future__ import annotations

import argparse

from pyoptim.benchmark.ops.adam import _step_of, param_list_op
from pyoptim.benchmark.harness import Case, Provider, pyoptim_providers

LR, BETAS, EPS, WEIGHT_DECAY = 1e-3, (0.9, 0.999), 1e-6, 1e-2


def bytes_moved(case: Case, dtype, opts: argparse.Namespace) -> int:
    """10 tensors' worth per element: p, g, m, v read, m, v written; then p, m, v read, p written."""
    import torch

    return case.numel * torch.empty((), dtype=dtype).element_size() * 10


def torch_lamb(foreach: bool):
    """LAMB in torch ops, as a user writes it."""
    import torch

    class TorchLAMB(torch.optim.Optimizer):
        def __init__(self, params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY):
            super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

        @torch.no_grad()
        def step(self):
            for group in self.param_groups:
                lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
                ps = [p for p in group["params"] if p.grad is not None]
                gs = [p.grad for p in ps]
                states = [self.state[p] for p in ps]
                for st, p in zip(states, ps):
                    if not st:
                        st.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                    st["step"] += 1
                ms = [st["exp_avg"] for st in states]
                vs = [st["exp_avg_sq"] for st in states]
                step = states[0]["step"] if states else 0
                bc1, bc2 = 1 - b1**step, 1 - b2**step
                if foreach:
                    torch._foreach_lerp_(ms, gs, 1 - b1)
                    torch._foreach_mul_(vs, b2)
                    torch._foreach_addcmul_(vs, gs, gs, value=1 - b2)
                    den = torch._foreach_div(vs, bc2)
                    torch._foreach_sqrt_(den)
                    torch._foreach_add_(den, eps)
                    u = torch._foreach_div(ms, bc1)
                    torch._foreach_div_(u, den)
                    torch._foreach_add_(u, ps, alpha=wd)
                    p_norm = torch.stack(torch._foreach_norm(ps))
                    u_norm = torch.stack(torch._foreach_norm(u))
                    ratio = torch.where((p_norm > 0) & (u_norm > 0), p_norm / u_norm, torch.ones_like(p_norm))
                    torch._foreach_mul_(u, (ratio * -lr).unbind())
                    torch._foreach_add_(ps, u)
                else:
                    for p, g, m, v in zip(ps, gs, ms, vs):
                        m.lerp_(g, 1 - b1)
                        v.mul_(b2).addcmul_(g, g, value=1 - b2)
                        u = (m / bc1).div_((v / bc2).sqrt_().add_(eps)).add_(p, alpha=wd)
                        p_norm, u_norm = p.norm(), u.norm()
                        ratio = torch.where((p_norm > 0) & (u_norm > 0), p_norm / u_norm, torch.ones_like(p_norm))
                        p.add_(u.mul_(ratio * -lr))

    return TorchLAMB


def providers(device, opts: argparse.Namespace) -> list[Provider]:
    """pyoptim's backends for the device and LAMB in torch (for-loop, foreach)."""
    import pyoptim

    hp = dict(lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    out = pyoptim_providers("lamb_step_", device, lambda b: _step_of(lambda ps: pyoptim.optim.LAMB(ps, **hp,
                                                                                                  backend=b)))
    return out + [Provider("torch-forloop", "torch", _step_of(lambda ps: torch_lamb(False)(ps, **hp))),
                  Provider("torch-foreach", "torch", _step_of(lambda ps: torch_lamb(True)(ps, **hp)))]


OP = param_list_op(
    name="lamb",
    description=f"LAMB step (lr={LR}, betas={BETAS}, eps={EPS}, weight_decay={WEIGHT_DECAY}), one optimizer.step()",
    bytes_moved=bytes_moved,
    providers=providers,
    baseline="torch-foreach",
    settings=lambda opts: {"optimizer": "LAMB", "lr": LR, "betas": BETAS, "eps": EPS, "weight_decay": WEIGHT_DECAY},
    api="pyoptim.optim.LAMB",
)
