"""clip_grad_norm_: pyoptim's backends against torch's for-loop and foreach versions.

One timed call is one clip_grad_norm_(params, max_norm) that scales: the
norm pass reads every grad, the scale pass reads and writes it, 12 bytes per
fp32 parameter. max_norm is 1e-3, so every call scales (by about 0.999 once
the first call has clipped), for every implementation alike.

Run on its own: python benchmarks/run.py --ops clip [options].
"""

from __future__ import annotations

import argparse

from pyoptim.benchmark.ops.adam import _params, param_list_op
from pyoptim.benchmark.harness import Case, Provider, pyoptim_providers

MAX_NORM = 1e-3


def bytes_moved(case: Case, dtype, opts: argparse.Namespace) -> int:
    """3 tensors' worth per element: g read (norm), g read and written (scale)."""
    import torch

    return case.numel * torch.empty((), dtype=dtype).element_size() * 3


def _clip_of(clip):
    def setup(inputs):
        params = _params(inputs)
        return lambda: clip(params, MAX_NORM)
    return setup


def providers(device, opts: argparse.Namespace) -> list[Provider]:
    """pyoptim's backends for the device and torch's for-loop and foreach clip_grad_norm_."""
    import torch

    from pyoptim.nn.utils import clip_grad_norm_

    out = pyoptim_providers("multi_tensor_norm", device,
                            lambda b: _clip_of(lambda ps, m: clip_grad_norm_(ps, m, backend=b)))
    for name, foreach in (("forloop", False), ("foreach", True)):
        out.append(Provider(f"torch-{name}", "torch",
                            _clip_of(lambda ps, m, f=foreach: torch.nn.utils.clip_grad_norm_(ps, m, foreach=f))))
    return out


OP = param_list_op(
    name="clip",
    description=f"clip_grad_norm_(max_norm={MAX_NORM}, norm_type=2): a norm pass and a scale pass",
    bytes_moved=bytes_moved,
    providers=providers,
    baseline="torch-foreach",
    settings=lambda opts: {"max_norm": MAX_NORM, "norm_type": 2.0},
    api="pyoptim.nn.utils.clip_grad_norm_",
    torch_api="torch.nn.utils.clip_grad_norm_",
)
