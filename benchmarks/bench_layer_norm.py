"""LayerNorm forward, backward and forward+backward: pyoptim's backends against torch (and Liger / apex on GPUs).

A case is a (rows, N) input and a pass: `fwd` (y = LayerNorm(x), no graph),
`bwd` (dx, dw, db from a saved forward) or `fwdbwd` (both, through autograd).
Bytes each pass must move, per element of x (the weight, bias and per-row
statistics are small beside it): fwd reads x and writes y (2), bwd reads x
and dy and writes dx (3), fwdbwd both (5), times the element size.

Run on its own: python benchmarks/bench_layer_norm.py [run.py's options].
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Case, Op, Provider, main, pyoptim_providers  # noqa: E402

SHAPES = ((8192, 1024), (4096, 4096), (16384, 768), (256, 65536))
PASSES = {"fwd": 2, "bwd": 3, "fwdbwd": 5}
CASES = {
    f"{m}x{n}-{p}": Case(f"{m}x{n}-{p}", ((m, n),), f"({m}, {n}) input, {p}")
    for (m, n) in SHAPES for p in PASSES
}


def _pass(case: Case) -> str:
    return case.name.rsplit("-", 1)[1]


def make_inputs(case: Case, device, dtype, opts: argparse.Namespace):
    """x, weight, bias (fp32 weights beside fp16/bf16 input, as mixed precision has them) and dy."""
    import torch

    g = torch.Generator(device=device).manual_seed(0)
    m, n = case.shapes[0]
    x = torch.randn(m, n, generator=g, device=device, dtype=dtype)
    wdtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    w = torch.randn(n, generator=g, device=device, dtype=wdtype)
    b = torch.randn(n, generator=g, device=device, dtype=wdtype)
    dy = torch.randn(m, n, generator=g, device=device, dtype=dtype)
    return x, w, b, dy, _pass(case)


def bytes_moved(case: Case, dtype, opts: argparse.Namespace) -> int:
    import torch

    return case.numel * torch.empty((), dtype=dtype).element_size() * PASSES[_pass(case)]


def _setup(layer_norm):
    """The timed call of one pass of `layer_norm(x, normalized_shape, w, b)`."""
    import torch

    def setup(inputs):
        x0, w0, b0, dy, which = inputs
        n = x0.shape[-1]
        if which == "fwd":
            def fwd():
                with torch.no_grad():
                    return layer_norm(x0, (n,), w0, b0)
            return fwd
        x, w, b = (t.detach().clone().requires_grad_() for t in (x0, w0, b0))
        if which == "bwd":
            y = layer_norm(x, (n,), w, b)
            return lambda: torch.autograd.grad(y, (x, w, b), dy, retain_graph=True)
        return lambda: torch.autograd.grad(layer_norm(x, (n,), w, b), (x, w, b), dy)
    return setup


def _missing(module: str):
    try:
        return None if importlib.util.find_spec(module) is not None else f"{module} is not importable"
    except (ImportError, ValueError):
        return f"{module} is not importable"


def providers(device, opts: argparse.Namespace) -> list[Provider]:
    """pyoptim's backends (reference only on request), torch, and Liger / apex on GPUs when importable."""
    import torch.nn.functional as F

    from pyoptim.nn.functional import layer_norm

    out = pyoptim_providers("layer_norm_fwd", device,
                            lambda b: _setup(lambda x, s, w, bias: layer_norm(x, s, w, bias, backend=b)))
    for p in out:
        if p.name == "pyoptim-reference":
            p.default = False  # plain torch ops: a test oracle, not a contender
    out.append(Provider("torch", "torch", _setup(F.layer_norm)))
    if device.type == "cuda":
        def liger(x, s, w, b):
            from liger_kernel.ops.layer_norm import LigerLayerNormFunction
            return LigerLayerNormFunction.apply(x, w, b, 1e-5)

        def apex(x, s, w, b):
            from apex.normalization.fused_layer_norm import fused_layer_norm_affine
            return fused_layer_norm_affine(x, w, b, s, 1e-5)

        out.append(Provider("liger", "peer", _setup(liger), unavailable=_missing("liger_kernel")))
        out.append(Provider("apex", "peer", _setup(apex), unavailable=_missing("apex")))
    return out


OP = Op(
    name="layer_norm",
    description="LayerNorm over the last dim (eps=1e-5, affine): forward, backward, forward+backward",
    cases=CASES,
    default_cases=tuple(CASES),
    make_inputs=make_inputs,
    bytes_moved=bytes_moved,
    providers=providers,
    baseline="torch",
    settings=lambda opts: {"eps": 1e-5, "affine": True},
)

if __name__ == "__main__":
    sys.exit(main(only=["layer_norm"]))
