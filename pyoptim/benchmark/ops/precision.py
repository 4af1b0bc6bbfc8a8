"""bf16 AdamW's step in each precision policy (issue 15) against torch's fused AdamW on bf16 params.

One timed call is one optimizer.step() with every .grad already set, on bf16
params whatever --dtype says. Providers are named by policy and state dtype,
with the bytes per param each keeps (params + state, from the optimizer's own
state after a step) in the name: pyoptim-<backend>-<policy>[-bf16state]-<B>Bpp.
torch keeps bf16 moments for bf16 params (6 bytes a param) and no master;
apex / torch with fp32 masters would keep 2 + 4 + 4 + 4 = 14 (16 with the
bf16 grad), the number the issue compares remainders' 8 with.

Bytes moved (for GB/s): those of the None policy, 7 x 2 per param; the
policies' extra traffic (masters 8, remainders 4 bytes a param) shows as a
lower rate.

Run on its own: python -m pyoptim.benchmark.ops.precision [run.py's options]; in make bench as --ops precision.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pyoptim.benchmark.harness import PARAM_CASES, Op, Provider, main
from pyoptim.benchmark.ops.adam import _params, make_inputs, torch_providers

LR, WEIGHT_DECAY = 1e-3, 1e-2
# (policy, state dtype) pairs timed: None is torch's behaviour.
POLICIES = ((None, None), ("fp32", None), ("remainder", None), ("remainder", "bf16"), ("stochastic", None))


def _bf16_inputs(case, device, dtype, opts):
    import torch

    return make_inputs(case, device, torch.bfloat16, opts)


def bytes_moved(case, dtype, opts: argparse.Namespace) -> int:
    return case.numel * 2 * 7


def bytes_per_param(opt: Any, params: list) -> float:
    """Params plus every per-element state tensor, per param (after one step)."""
    total = sum(p.numel() * p.element_size() for p in params)
    for p in params:
        total += sum(t.numel() * t.element_size() for t in opt.state[p].values() if t.dim() > 0)
    return total / sum(p.numel() for p in params)


def providers(device, opts: argparse.Namespace) -> list[Provider]:
    """pyoptim's dispatched backend in each policy, and torch's foreach and fused AdamW, on bf16 params."""
    import torch

    import pyoptim
    from pyoptim import _backends

    backend = "cuda" if device.type == "cuda" else "cpu"
    unavailable = None if backend in _backends.available("adam_step_", device.type) else f"no {backend} backend"
    hp = dict(lr=LR, weight_decay=WEIGHT_DECAY)
    out = []
    for policy, state in POLICIES:
        kw = dict(hp, master_weights=policy, state_dtype=torch.bfloat16 if state else None, backend=backend)
        probe = [torch.zeros(64, dtype=torch.bfloat16, device=device, requires_grad=True)]
        o = pyoptim.optim.AdamW(probe, **kw)
        probe[0].grad = torch.zeros_like(probe[0])
        if unavailable is None:
            o.step()
        bpp = bytes_per_param(o, probe) if unavailable is None else 0
        name = f"pyoptim-{backend}-{policy or 'none'}{'-bf16state' if state else ''}-{bpp:g}Bpp"

        def setup(inputs, kw=kw):
            return pyoptim.optim.AdamW(_params(inputs), **kw).step

        out.append(Provider(name, "pyoptim", setup, unavailable=unavailable))
    out += torch_providers(lambda ps, **kw: torch.optim.AdamW(ps, **hp, **kw), variants=("foreach", "fused"))
    return out


OP = Op(
    name="precision",
    description=f"bf16 AdamW step per precision policy (lr={LR}, weight_decay={WEIGHT_DECAY}), bytes/param in names",
    cases=PARAM_CASES,
    default_cases=("large", "many_small"),
    make_inputs=_bf16_inputs,
    bytes_moved=bytes_moved,
    providers=providers,
    baseline="torch-fused",
    settings=lambda opts: {"optimizer": "AdamW", "params": "bfloat16", "policies": [str(p) for p in POLICIES]},
)

if __name__ == "__main__":
    sys.exit(main(only=["precision"]))
