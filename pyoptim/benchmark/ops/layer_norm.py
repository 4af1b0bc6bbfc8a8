"""LayerNorm and RMSNorm forward, backward and forward+backward: pyoptim's backends against torch (and Liger /
apex on GPUs, for LayerNorm).

A case is a (rows, N) input and a pass: `fwd` (y = LayerNorm(x), no graph),
`bwd` (dx, dw, db from a saved forward) or `fwdbwd` (both, through autograd).
Bytes each pass must move, per element of x (the weight, bias and per-row
statistics are small beside it): fwd reads x and writes y (2), bwd reads x
and dy and writes dx (3), fwdbwd both (5), times the element size. RMSNorm
moves the same bytes (no bias, no mean).

Run on its own: python benchmarks/run.py --ops layer_norm,rms_norm [options]; on your own shapes:
python -m pyoptim.benchmark --layer-norm 8192x4096.
"""

from __future__ import annotations

import argparse

from pyoptim.benchmark.harness import Case, Op, Provider, missing_module, pyoptim_providers

SHAPES = ((8192, 1024), (4096, 4096), (16384, 768), (256, 65536))
PASSES = {"fwd": 2, "bwd": 3, "fwdbwd": 5}


def norm_case(m: int, n: int, which: str) -> Case:
    """The case of a (m, n) input and pass `which` ("fwd", "bwd", "fwdbwd"), named as make_inputs reads it."""
    return Case(f"{m}x{n}-{which}", ((m, n),), f"({m}, {n}) input, {which}")


CASES = {c.name: c for c in (norm_case(m, n, p) for (m, n) in SHAPES for p in PASSES)}


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
    """The timed call of one pass of `layer_norm(x, normalized_shape, w, b)` (RMSNorm: b is None)."""
    import torch

    def setup(inputs):
        x0, w0, b0, dy, which = inputs
        n = x0.shape[-1]
        if which == "fwd":
            def fwd():
                with torch.no_grad():
                    return layer_norm(x0, (n,), w0, b0)
            return fwd
        x, w, b = (None if t is None else t.detach().clone().requires_grad_() for t in (x0, w0, b0))
        wrt = tuple(t for t in (x, w, b) if t is not None)
        if which == "bwd":
            y = layer_norm(x, (n,), w, b)
            return lambda: torch.autograd.grad(y, wrt, dy, retain_graph=True)
        return lambda: torch.autograd.grad(layer_norm(x, (n,), w, b), wrt, dy)
    return setup


def providers(device, opts: argparse.Namespace) -> list[Provider]:
    """pyoptim's backends (reference only on request), torch, and Liger / apex on GPUs when importable."""
    import torch.nn.functional as F

    from pyoptim.nn.functional import layer_norm

    out = pyoptim_providers("layer_norm_fwd", device,
                            lambda b: _setup(lambda x, s, w, bias: layer_norm(x, s, w, bias, backend=b)),
                            reference=False)
    out.append(Provider("torch", "torch", _setup(F.layer_norm)))
    if device.type == "cuda":
        def liger(x, s, w, b):
            from liger_kernel.ops.layer_norm import LigerLayerNormFunction
            return LigerLayerNormFunction.apply(x, w, b, 1e-5)

        def apex(x, s, w, b):
            from apex.normalization.fused_layer_norm import fused_layer_norm_affine
            return fused_layer_norm_affine(x, w, b, s, 1e-5)

        out.append(Provider("liger", "peer", _setup(liger), unavailable=missing_module("liger_kernel")))
        out.append(Provider("apex", "peer", _setup(apex), unavailable=missing_module("apex")))
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
    case_kind="rows",
    settings=lambda opts: {"eps": 1e-5, "affine": True},
    api="pyoptim.nn.LayerNorm",
    torch_api="torch.nn.LayerNorm",
)


def make_rms_inputs(case: Case, device, dtype, opts: argparse.Namespace):
    """LayerNorm's inputs without the bias."""
    x, w, _, dy, which = make_inputs(case, device, dtype, opts)
    return x, w, None, dy, which


def rms_providers(device, opts: argparse.Namespace) -> list[Provider]:
    """pyoptim's backends (reference only on request) and torch's F.rms_norm."""
    import torch.nn.functional as F

    from pyoptim.nn.functional import rms_norm

    out = pyoptim_providers("rms_norm_fwd", device,
                            lambda b: _setup(lambda x, s, w, bias: rms_norm(x, s, w, 1e-5, backend=b)),
                            reference=False)
    out.append(Provider("torch", "torch", _setup(lambda x, s, w, bias: F.rms_norm(x, s, w, 1e-5))))
    return out


RMS_OP = Op(
    name="rms_norm",
    description="RMSNorm over the last dim (eps=1e-5, weight): forward, backward, forward+backward",
    cases=CASES,
    # fwd+bwd only by default (make bench's time): the passes apart are as LayerNorm's.
    default_cases=tuple(c for c in CASES if c.endswith("-fwdbwd")),
    make_inputs=make_rms_inputs,
    bytes_moved=bytes_moved,
    providers=rms_providers,
    baseline="torch",
    case_kind="rows",
    settings=lambda opts: {"eps": 1e-5, "affine": True},
    api="pyoptim.nn.RMSNorm",
    torch_api="torch.nn.RMSNorm",
)

OPS = [OP, RMS_OP]
