"""BatchNorm2d in training mode, forward, backward and forward+backward: pyoptim's backends against torch's
(cuDNN on GPUs, ATen's kernels on CPU), in NCHW and channels_last.

A case is an (N, C, H, W) input, a layout (`nchw`: contiguous; `cl`: channels_last) and a pass: `fwd`
(y = BatchNorm2d(x) with the batch's statistics, running statistics moved, no graph), `bwd` (dx, dw, db from
a saved forward) or `fwdbwd` (both, through autograd). The shapes are ResNet-50's: an early layer
(64, 64, 56, 56), a late one with many channels (256, 256, 14, 14), and the last, small one (32, 512, 7, 7).

Bytes each pass must move, the minimum (what the roofline is of):
  fwd     reads x, writes y                                     2 x numel x element size
          + per channel: weight, bias, running_mean, running_var read; the two running statistics written
            (parameter dtype); save_mean, save_invstd written (float32; float64 for fp64)
  bwd     reads x and dy, writes dx                             3 x numel x element size
          + per channel: weight, save_mean, save_invstd read; grad_weight, grad_bias written
  fwdbwd  the sum of both.
A training forward must see every element of a channel before it can normalize any, so unless x stays in
cache between the two it reads x twice (statistics, then normalize): 3 x numel moved against the 2 counted,
so a two-pass kernel tops out at 2/3 of the roofline on a large input; the backward likewise reads x and dy
twice (reductions, then dx): 5 x numel against 3, at most 3/5. The counted minimum keeps the fractions
comparable with the other ops' and shows what a cache-resident (single-read) kernel could reach.

Run on its own: python benchmarks/run.py --ops batch_norm [options], e.g.
    python benchmarks/run.py --ops batch_norm --quick --impls pyoptim-reference,torch --cases 32x512x7x7-nchw-fwd
"""

from __future__ import annotations

import argparse
import math

from pyoptim.benchmark.harness import Case, Op, Provider, pyoptim_providers

SHAPES = ((64, 64, 56, 56), (256, 256, 14, 14), (32, 512, 7, 7))
LAYOUTS = {"nchw": "contiguous (NCHW)", "cl": "channels_last"}
PASSES = ("fwd", "bwd", "fwdbwd")
MOMENTUM, EPS = 0.1, 1e-5


def bn_case(shape: tuple[int, int, int, int], layout: str, which: str) -> Case:
    """The case of an (N, C, H, W) input in `layout` ("nchw", "cl") and pass `which`, named as make_inputs reads it."""
    name = f"{'x'.join(map(str, shape))}-{layout}-{which}"
    return Case(name, (tuple(shape),), f"{tuple(shape)} input, {LAYOUTS[layout]}, {which}")


CASES = {c.name: c for c in (bn_case(s, layout, p) for s in SHAPES for layout in LAYOUTS for p in PASSES)}


def _layout_and_pass(case: Case) -> tuple[str, str]:
    _, layout, which = case.name.split("-")
    return layout, which


def _param_dtype(dtype):
    """float32 parameters and running statistics beside fp16/bf16 input (mixed precision; cuDNN requires it)."""
    import torch

    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def make_inputs(case: Case, device, dtype, opts: argparse.Namespace):
    """x and dy in the case's layout; weight, bias, running mean and variance (each provider copies the last two)."""
    import torch

    g = torch.Generator(device=device).manual_seed(0)
    n, c, h, w = case.shapes[0]
    layout, which = _layout_and_pass(case)
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    x = torch.randn(n, c, h, w, generator=g, device=device, dtype=dtype).contiguous(memory_format=fmt)
    dy = torch.randn(n, c, h, w, generator=g, device=device, dtype=dtype).contiguous(memory_format=fmt)
    pdtype = _param_dtype(dtype)
    weight = torch.randn(c, generator=g, device=device, dtype=pdtype)
    bias = torch.randn(c, generator=g, device=device, dtype=pdtype)
    running_mean = torch.zeros(c, device=device, dtype=pdtype)
    running_var = torch.ones(c, device=device, dtype=pdtype)
    return x, weight, bias, running_mean, running_var, dy, which


def bytes_moved(case: Case, dtype, opts: argparse.Namespace) -> int:
    import torch

    n, c, h, w = case.shapes[0]
    _, which = _layout_and_pass(case)
    size = torch.empty((), dtype=dtype).element_size()
    psize = torch.empty((), dtype=_param_dtype(dtype)).element_size()
    ssize = 8 if dtype == torch.float64 else 4  # statistics: float32, float64 for fp64
    numel = math.prod(case.shapes[0])
    fwd = 2 * numel * size + c * (6 * psize + 2 * ssize)
    bwd = 3 * numel * size + c * (3 * psize + 2 * ssize)
    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}[which]


def _setup(batch_norm):
    """The timed call of one pass of `batch_norm(x, running_mean, running_var, weight, bias, training, momentum,
    eps)` in training mode (F.batch_norm's signature)."""
    import torch

    def setup(inputs):
        x0, w0, b0, rm0, rv0, dy, which = inputs
        rm, rv = rm0.clone(), rv0.clone()  # written by every call: this provider's own
        if which == "fwd":
            def fwd():
                with torch.no_grad():
                    return batch_norm(x0, rm, rv, w0, b0, True, MOMENTUM, EPS)
            return fwd
        x, w, b = (t.detach().clone(memory_format=torch.preserve_format).requires_grad_() for t in (x0, w0, b0))
        if which == "bwd":
            y = batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS)
            return lambda: torch.autograd.grad(y, (x, w, b), dy, retain_graph=True)
        return lambda: torch.autograd.grad(batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS), (x, w, b), dy)
    return setup


def providers(device, opts: argparse.Namespace) -> list[Provider]:
    """pyoptim's backends (reference only on request) and torch's F.batch_norm."""
    import torch.nn.functional as F

    from pyoptim.nn.functional import batch_norm

    def ours(backend):
        return _setup(lambda x, rm, rv, w, b, training, momentum, eps: batch_norm(
            x, rm, rv, w, b, training, momentum, eps, backend=backend))

    out = pyoptim_providers("batch_norm_fwd", device, ours, reference=False)
    out.append(Provider("torch", "torch", _setup(F.batch_norm)))
    return out


OP = Op(
    name="batch_norm",
    description="BatchNorm2d, training mode (batch statistics, running statistics moved; eps=1e-5, momentum=0.1, "
                "affine): forward, backward, forward+backward, NCHW and channels_last",
    cases=CASES,
    default_cases=tuple(CASES),
    make_inputs=make_inputs,
    bytes_moved=bytes_moved,
    providers=providers,
    baseline="torch",
    case_kind="nchw",
    settings=lambda opts: {"eps": EPS, "momentum": MOMENTUM, "affine": True, "training": True,
                           "param_dtype": "float32 for fp16/bf16 input, else the input's"},
    api="pyoptim.nn.BatchNorm2d",
    torch_api="torch.nn.BatchNorm2d",
)
