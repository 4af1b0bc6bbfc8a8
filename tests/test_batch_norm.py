"""BatchNorm / InstanceNorm: every backend against torch (F.batch_norm, F.instance_norm, torch.nn's modules),
the six batch_norm_* ops, and the nn API (SyncBatchNorm across processes: test_sync_batch_norm.py)."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F

import pyoptim
from pyoptim import _backends
from tests.conftest import HAS_CUDA, TOL, assert_compiled_autograd_equals_eager, assert_grads_of_some_leaves, impls

NAMES = ("out", "grad_input", "grad_weight", "grad_bias", "running_mean", "running_var")
CL = {4: torch.channels_last, 5: torch.channels_last_3d}


def _device(impl) -> torch.device:
    return torch.device("cuda" if impl[0] == "cuda" else "cpu")


def _interpreted(impl) -> bool:
    return impl[1] == "triton" and impl[0] == "cpu"


def _input(shape, layout="nchw", dtype=torch.float32, device="cpu", mean=3.0, std=2.0) -> torch.Tensor:
    """An (N, C, *) input of `shape` in `layout`: nchw (contiguous), channels_last (channels_last or
    channels_last_3d), nlc ((N, *, C) contiguous, dims moved: channels-last for any rank) or sliced
    (every other element of the last dim: not dense, read through a copy)."""
    n, c, *spatial = shape
    if layout == "nlc":
        x = torch.randn(n, *spatial, c, device=device).movedim(-1, 1)
    elif layout == "sliced":
        x = torch.randn(*shape[:-1], 2 * shape[-1], device=device)[..., ::2]
    else:
        x = torch.randn(*shape, device=device)
    x = (x * std + mean).to(dtype)  # .to keeps the strides of a dense tensor
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL[len(shape)])
    return x


def _is_channels_last(x: torch.Tensor) -> bool:
    """Dense with C innermost: the second layout the kernels read natively."""
    return x.dim() >= 3 and x.permute(0, *range(2, x.dim()), 1).is_contiguous()


def _assert_layout(t: torch.Tensor, x: torch.Tensor, what: str) -> None:
    """t is laid out as the spec says an output shaped like x is: x's own strides when x is NCHW-contiguous
    or channels-last, else contiguous (x was copied). Strides of size-1 dims carry no layout and are ignored."""
    expect = x.stride() if x.is_contiguous() or _is_channels_last(x) else torch.empty(x.shape).stride()
    got = [s for s, n in zip(t.stride(), t.shape) if n > 1]
    want = [s for s, n in zip(expect, x.shape) if n > 1]
    assert t.shape == x.shape and got == want, f"{what}: strides {t.stride()}, expected {expect} (input {x.stride()})"


def _scaled_tol(expected: torch.Tensor) -> dict:
    """TOL, with atol relative to the tensor's largest magnitude: a per-channel sum's rounding (the statistics,
    the weight grads) is relative to its terms, and the result can cancel to near 0."""
    tol = TOL[expected.dtype]
    scale = max(1.0, float(expected.detach().abs().max())) if expected.numel() else 1.0
    return dict(rtol=tol["rtol"], atol=tol["atol"] * scale)


def _ours(backend):
    def batch_norm(x, rm, rv, w, b, training, momentum, eps):
        return pyoptim.nn.functional.batch_norm(x, rm, rv, w, b, training, momentum, eps, backend=backend)
    return batch_norm


def _theirs(x, rm, rv, w, b, training, momentum, eps):
    return F.batch_norm(x, rm, rv, w, b, training, momentum, eps)


def _run(fn, x, rm, rv, w, b, dy, training=True, momentum=0.1, eps=1e-5):
    """[out, grad_input, grad_weight, grad_bias, running_mean, running_var] of one call of fn on leaves that
    share x's strides, and on copies of the running statistics (None where not given). The grads come from
    torch.autograd.grad: as the backward returned them, with their own strides (a leaf's .grad would be
    restrided like the leaf)."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, w, b)]
    rm, rv = (t.clone() if t is not None else None for t in (rm, rv))
    y = fn(leaves[0], rm, rv, leaves[1], leaves[2], training, momentum, eps)
    wanted = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(y, wanted, dy))
    return [y.detach()] + [next(grads) if t is not None else None for t in leaves] + [rm, rv]


def _params(c, dtype, device, affine="both", running=True):
    """weight, bias (per `affine`: both, weight, bias, none) and running mean and variance (or None)."""
    w = torch.randn(c, device=device).to(dtype) if affine in ("both", "weight") else None
    b = torch.randn(c, device=device).to(dtype) if affine in ("both", "bias") else None
    rm = (torch.randn(c, device=device) * 0.5 + 3).to(dtype) if running else None
    rv = (torch.rand(c, device=device) * 4 + 0.5).to(dtype) if running else None
    return w, b, rm, rv


def _assert_matches_torch(impl, x, *, training=True, affine="both", running=True, momentum=0.1, eps=1e-5,
                          dy=None, tol=None):
    """Output, grads and running statistics against torch's, run in float64 and rounded to our dtypes (torch's
    own float32 is not the truth: its sums round too), and the output and grad_input laid out as the input,
    whatever dy's layout."""
    w, b, rm, rv = _params(x.shape[1], x.dtype, x.device, affine, running)
    dy = torch.randn_like(x) if dy is None else dy
    ours = _run(_ours(impl[1]), x, rm, rv, w, b, dy, training, momentum, eps)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    exact = _run(_theirs, d(x), d(rm), d(rv), d(w), d(b), d(dy), training, momentum, eps)
    for name, a, e in zip(NAMES, ours, exact):
        if e is None:
            assert a is None, name
            continue
        e = e.to(x.dtype)
        assert a.dtype == e.dtype and a.shape == e.shape, (name, a.dtype, e.dtype, a.shape, e.shape)
        torch.testing.assert_close(a, e, **(tol or _scaled_tol)(e), msg=lambda m: f"{name}: {m}")
    _assert_layout(ours[0], x, "out")
    _assert_layout(ours[1], x, "grad_input")
    return ours


# -- against torch: shapes, layouts, train and eval ------------------------------------------------------------

SHAPES = [
    ((7, 5), "nchw"),  # (N, C): S = 1, BatchNorm1d's 2-d input; odd C
    ((64, 130), "nchw"),  # (N, C) with C past a 128-wide tile: 2 channels in a second one
    ((4, 3, 17), "nchw"),  # (N, C, L): L odd, no whole 16-byte vector per channel row
    ((4, 13, 9), "nlc"),  # (N, L, C) contiguous seen as (N, C, L): channels-last without a memory format
    ((3, 6, 5, 7), "nchw"),  # (N, C, H, W)
    ((3, 6, 5, 7), "channels_last"),  # channels_last: C innermost, N * H * W rows of C
    ((2, 3, 3, 4, 5), "nchw"),  # (N, C, D, H, W)
    ((2, 3, 3, 4, 5), "channels_last"),  # channels_last_3d
    ((1, 5, 9), "nchw"),  # N = 1, L > 1: count = S, one sample's worth
    ((1, 7, 3, 3), "channels_last"),  # N = 1 in channels-last
    ((5, 1, 6, 6), "channels_last"),  # C = 1: NCHW-contiguous and channels-last at once
    ((2, 67, 4, 4), "channels_last"),  # C = 67: past a 64-channel tile, odd; rows of C end in a tail
    ((3, 6, 5, 8), "sliced"),  # not dense: read through a contiguous copy, outputs contiguous
    ((16, 3, 33, 33), "nchw"),  # count = 17424 per channel: many blocks per channel in every reduction
    ((16, 3, 33, 33), "channels_last"),  # the same with 17424 rows of 3 channels
]


def _shape_id(v):
    return f"{'x'.join(map(str, v[0]))}-{v[1]}"


def _shape_params(cases):
    """pytest.param((shape, layout)...) with readable ids."""
    return [pytest.param(*c, id=_shape_id(c)) for c in cases]


def _sized_for(impl, shape):
    """shape, with the batch cut to 2 under the Triton interpreter when it is large: the interpreter runs each
    program in Python, and 17424-element channels take seconds a pass; 2178 still span several blocks."""
    if _interpreted(impl) and math.prod(shape) > 20000:
        return (2,) + tuple(shape[1:])
    return shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,layout", _shape_params(SHAPES))
def test_matches_torch(bn_impl, shape, layout, training, dtype):
    x = _input(_sized_for(bn_impl, shape), layout, dtype, _device(bn_impl))
    _assert_matches_torch(bn_impl, x, training=training)


@pytest.mark.parametrize("dy_layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("x_layout", ["nchw", "channels_last"])
def test_grad_input_follows_the_input_layout(bn_impl, x_layout, dy_layout):
    """grad_out in the other layout: grad_input still comes back in the input's (grad_out is what gets copied)."""
    device = _device(bn_impl)
    x = _input((3, 5, 4, 6), x_layout, device=device)
    dy = _input((3, 5, 4, 6), dy_layout, device=device, mean=0, std=1)
    for training in (True, False):
        _assert_matches_torch(bn_impl, x, training=training, dy=dy)


@pytest.mark.parametrize("affine", ["none", "weight", "bias"])
def test_without_affine(bn_impl, affine):
    device = _device(bn_impl)
    for shape, layout in [((6, 5), "nchw"), ((3, 5, 4, 4), "channels_last")]:
        for training in (True, False):
            _assert_matches_torch(bn_impl, _input(shape, layout, device=device), training=training, affine=affine)


@pytest.mark.parametrize("affine", ["both", "none"])
def test_training_without_running_stats(bn_impl, affine):
    """track_running_stats=False: batch statistics, nothing to update."""
    device = _device(bn_impl)
    for shape, layout in [((6, 5), "nchw"), ((3, 5, 4, 4), "nchw"), ((3, 5, 4, 4), "channels_last")]:
        _assert_matches_torch(bn_impl, _input(shape, layout, device=device), running=False, affine=affine)


@pytest.mark.parametrize("momentum", [0.0, 0.37, 1.0])
def test_momentum(bn_impl, momentum):
    # 0: running statistics stay; 1: they become the batch's (the variance unbiased).
    _assert_matches_torch(bn_impl, _input((4, 6, 5), device=_device(bn_impl)), momentum=momentum)


@pytest.mark.parametrize("eps", [1e-3, 0.5])
def test_eps(bn_impl, eps):
    device = _device(bn_impl)
    for training in (True, False):
        # Small variance: eps is a large part of var + eps.
        _assert_matches_torch(bn_impl, _input((5, 4, 6), device=device, std=0.05), training=training, eps=eps)


def test_eval_with_zero_eps(bn_impl):
    # eps = 0 is allowed outside training (torch's rule); running_var > 0 keeps it finite.
    _assert_matches_torch(bn_impl, _input((5, 4, 6), device=_device(bn_impl)), training=False, eps=0.0)


def test_running_stats_updated_in_place(bn_impl):
    """As torch's: the very running_mean / running_var tensors passed change in training, not in eval."""
    device = _device(bn_impl)
    x = _input((4, 3, 5), device=device)
    _, _, rm, rv = _params(3, torch.float32, device)
    rm0, rv0, ptrs = rm.clone(), rv.clone(), (rm.data_ptr(), rv.data_ptr())
    pyoptim.nn.functional.batch_norm(x, rm, rv, training=False, backend=bn_impl[1])
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    pyoptim.nn.functional.batch_norm(x, rm, rv, training=True, momentum=0.25, backend=bn_impl[1])
    tm, tv = rm0.clone(), rv0.clone()
    F.batch_norm(x, tm, tv, training=True, momentum=0.25)
    assert (rm.data_ptr(), rv.data_ptr()) == ptrs
    torch.testing.assert_close(rm, tm, **TOL[torch.float32])
    torch.testing.assert_close(rv, tv, **TOL[torch.float32])


def test_empty_batch(bn_impl):
    """N = 0 (and a spatial size 0) in training: an empty output, running statistics left as they are (torch's
    behaviour), empty grads of the input and zero grads of weight and bias."""
    device = _device(bn_impl)
    for shape in [(0, 3), (0, 3, 4, 4), (2, 3, 0)]:
        x = torch.randn(shape, device=device)
        w, b, rm, rv = _params(3, torch.float32, device)
        ours = _run(_ours(bn_impl[1]), x, rm, rv, w, b, torch.randn_like(x))
        theirs = _run(_theirs, x, rm, rv, w, b, torch.randn_like(x))
        for name, a, e in zip(NAMES, ours, theirs):
            assert a.shape == e.shape and a.dtype == e.dtype, (shape, name)
            torch.testing.assert_close(a, e, rtol=0, atol=0, msg=lambda m: f"{shape} {name}: {m}")


def test_weight_grads_are_deterministic(bn_impl):
    device = _device(bn_impl)
    shape = (4, 8, 16, 16) if _interpreted(bn_impl) else (32, 16, 32, 32)
    for layout in ("nchw", "channels_last"):
        x = _input(shape, layout, device=device)
        w, b, rm, rv = _params(shape[1], torch.float32, device)
        dy = torch.randn_like(x)
        first = _run(_ours(bn_impl[1]), x, rm, rv, w, b, dy)
        second = _run(_ours(bn_impl[1]), x, rm, rv, w, b, dy)
        for name, a, c in zip(NAMES, first, second):
            assert torch.equal(a, c), (layout, name)


# -- numerics: far-off means, bf16/fp16 -----------------------------------------------------------------------


@pytest.mark.parametrize("shape,layout", _shape_params([
    ((8, 5, 16, 16), "nchw"), ((8, 5, 16, 16), "channels_last"),
    ((600, 7), "nchw"),  # (N, C): the count is the batch, the channels interleaved
]))
def test_mean_far_above_std(bn_impl, shape, layout):
    """Mean 500 x std: a one-pass E[x^2] - E[x]^2 variance keeps no digit in float32 (E[x^2] ~ 2.5e5, its
    rounding ~0.02 per term against a variance of 1) and can even go negative; Welford or two passes keep
    ~4 digits. momentum = 1 makes the running statistics the batch's own."""
    x = _input(shape, layout, device=_device(bn_impl), mean=500.0, std=1.0)
    ours = _assert_matches_torch(
        bn_impl, x, momentum=1.0,
        # The batch mean's rounding (~ulp(500) * sqrt(count)) shifts every x - mean: ~1e-3 of the std.
        tol=lambda e: dict(rtol=1e-3, atol=5e-3 * max(1.0, float(e.abs().max()))))
    assert torch.isfinite(ours[5]).all()


def _rel_err(a: torch.Tensor, e: torch.Tensor) -> float:
    return float((a.double().cpu() - e).norm() / e.norm().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("param_dtype", ["input", "float32"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,layout", _shape_params([
    ((8, 13, 7, 7), "nchw"), ((8, 13, 7, 7), "channels_last"),
    ((64, 130), "nchw"),  # C past a 128-wide tile
]))
def test_low_precision_vs_float64(bn_impl, shape, layout, training, param_dtype, dtype):
    """Each output's (and running statistic's) error against a float64 run is at most twice torch's own:
    float32 math, one rounding per output. Parameters and running statistics in the input's dtype or float32
    (mixed precision's choice)."""
    device = _device(bn_impl)
    pdtype = dtype if param_dtype == "input" else torch.float32
    x = _input(shape, layout, dtype, device)
    w, b, rm, rv = _params(shape[1], pdtype, device)
    dy = torch.randn_like(x)
    args = (rm, rv, w, b, dy, training)
    ours = _run(_ours(bn_impl[1]), x, *args)
    theirs = _run(_theirs, x, *args)  # torch's own on this device
    exact = _run(_theirs, *(t.double().cpu() for t in (x, rm, rv, w, b, dy)), training)
    # The interpreter rounds fp32 -> bf16 by truncation (DESIGN.md): one ulp, not half.
    factor = 4.0 if _interpreted(bn_impl) and dtype == torch.bfloat16 else 2.0
    for name, a, t, e, dt in zip(NAMES, ours, theirs, exact, [dtype] * 2 + [pdtype] * 4):
        assert a.dtype == t.dtype == dt, (name, a.dtype, t.dtype)
        e_ours, e_torch = _rel_err(a, e), _rel_err(t, e)
        assert e_ours <= factor * e_torch + 1e-6, (name, e_ours, e_torch)
    _assert_layout(ours[0], x, "out")
    _assert_layout(ours[1], x, "grad_input")


def test_count_of_one_per_channel_through_the_op(bn_impl):
    """count = 1 passed to the op itself (the functional refuses it first): the unbiased running variance is
    0 / 0, nan as torch's, and the output is the bias (xhat = 0)."""
    device = _device(bn_impl)
    x = torch.randn(1, 3, device=device)
    w, b, rm, rv = _params(3, torch.float32, device)
    out, mean, invstd, nrm, nrv = _backends.get("batch_norm_fwd", bn_impl[1])(x, w, b, rm, rv, True, 0.1, 1e-5)
    tm, tv = rm.clone(), rv.clone()
    torch.native_batch_norm(x, w, b, tm, tv, True, 0.1, 1e-5)
    # (x - mean) * (invstd * w) + b is exactly b; x * scale + (b - mean * scale) leaves one rounding of
    # x * scale, scale = w / sqrt(eps) (torch's own form: its output is ~1e-5 here, not 0).
    scale = 1e-5 ** -0.5 * float(w.abs().max())
    torch.testing.assert_close(out, b.expand(1, 3), rtol=0, atol=2 * scale * float(x.abs().max()) * 1.2e-7)
    torch.testing.assert_close(mean, x[0], rtol=0, atol=0)
    torch.testing.assert_close(nrm, tm, **TOL[torch.float32])
    assert torch.isnan(nrv).all() and torch.isnan(tv).all()


# -- gradcheck ------------------------------------------------------------------------------------------------


# Which leaves require grad (x, weight, bias), and which of weight/bias are given: the backward's
# output_mask comes from both.
_SUBSETS = ["x", "weight", "bias", "weight,bias", "x,bias", "x,bias;no_weight", "bias;no_weight", "x;no_affine"]


@pytest.mark.parametrize("case", _SUBSETS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_grads_of_some_leaves_only(bn_impl, case, training):
    """Only the leaves that require grad get one, each equal to torch's."""
    device = _device(bn_impl)
    need, _, given = case.partition(";")
    need = need.split(",")
    x = _input((3, 4, 5), "nchw", torch.float64, device)
    w, b, rm, rv = _params(4, torch.float64, device, {"no_weight": "bias", "no_affine": "none"}.get(given, "both"))
    ours, theirs = (lambda x_, w_, b_, fn=fn: fn(x_, rm.clone(), rv.clone(), w_, b_, training, 0.1, 1e-5)
                    for fn in (_ours(bn_impl[1]), _theirs))
    assert_grads_of_some_leaves(ours, theirs, dict(x=x, weight=w, bias=b), need, torch.randn_like(x))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torch_func_grad(bn_impl, training):
    """torch.func.grad (note [torch.func]) against torch's, running statistics moved alike; the Triton backend,
    whose launchers take raw pointers, refuses with a clear error."""
    device = _device(bn_impl)
    x = _input((4, 3, 5), "nchw", torch.float64, device)
    w, b, rm, rv = _params(3, torch.float64, device)
    stats = {}

    def loss(fn, key):
        def f(x, w, b):
            stats[key] = (rm.clone(), rv.clone())
            return (fn(x, *stats[key], w, b, training, 0.1, 1e-5) ** 2).sum()
        return f

    if bn_impl[1] == "triton":  # raw pointers: refused with a clear error
        with pytest.raises(RuntimeError, match="cannot run inside torch.func"):
            torch.func.grad(loss(_ours(bn_impl[1]), "ours"), (0, 1, 2))(x, w, b)
        return
    ours = torch.func.grad(loss(_ours(bn_impl[1]), "ours"), (0, 1, 2))(x, w, b)
    theirs = torch.func.grad(loss(_theirs, "theirs"), (0, 1, 2))(x, w, b)
    for a, e in zip(ours, theirs):
        torch.testing.assert_close(a, e)
    for a, e in zip(stats["ours"], stats["theirs"]):
        torch.testing.assert_close(a, e)


def test_double_backward_raises(bn_impl):
    """No second derivative: a clear error, not zeros."""
    device = _device(bn_impl)
    x = torch.randn(4, 3, 5, device=device, requires_grad=True)
    w = torch.randn(3, device=device, requires_grad=True)
    y = pyoptim.nn.functional.batch_norm(x, None, None, w, None, True, backend=bn_impl[1])
    (g,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented|once_differentiable|no autograd formula"):
        g.sum().backward()


def test_gradcheck_float64(bn_impl):
    device = _device(bn_impl)
    f64 = dict(dtype=torch.float64, device=device)
    backend = bn_impl[1]
    # The interpreter takes ~50 ms a call and the full check two calls per input element: its fast mode
    # checks a random projection of the Jacobian instead (still every output against every input).
    gradcheck = functools.partial(torch.autograd.gradcheck, fast_mode=_interpreted(bn_impl))
    for shape, layout in [((3, 2, 4), "nchw"), ((2, 3, 2, 2), "channels_last"), ((5, 2), "nchw")]:
        x = _input(shape, layout, torch.float64, device).requires_grad_()
        w = torch.randn(shape[1], **f64).requires_grad_()
        b = torch.randn(shape[1], **f64).requires_grad_()
        rm, rv = torch.zeros(shape[1], **f64), torch.ones(shape[1], **f64) * 2
        for training in (True, False):
            def fn(x, w, b):
                return pyoptim.nn.functional.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5,
                                                        backend=backend)
            assert gradcheck(fn, (x, w, b)), (shape, layout, training)
        # Without affine parameters (the input's grad alone) and without running statistics.
        assert gradcheck(
            lambda x: pyoptim.nn.functional.batch_norm(x, None, None, training=True, backend=backend), (x,))
    x = _input((2, 3, 4), "nchw", torch.float64, device).requires_grad_()
    w = torch.randn(3, **f64).requires_grad_()
    b = torch.randn(3, **f64).requires_grad_()
    assert gradcheck(
        lambda x, w, b: pyoptim.nn.functional.instance_norm(x, None, None, w, b, backend=backend), (x, w, b))


# -- bad input: torch's errors, raised before running statistics change -------------------------------------


def _bad_cases():
    # name: (input shape, running_mean size, running_var size, weight size, bias size, training, eps, type)
    # The size None means "not given".
    return {
        "one_value_per_channel": ((1, 3), 3, 3, 3, 3, True, 1e-5, ValueError),
        "one_value_per_channel_spatial_1": ((1, 3, 1), 3, 3, 3, 3, True, 1e-5, ValueError),  # S = 1 too
        "one_value_per_channel_no_stats": ((1, 3), None, None, None, None, True, 1e-5, ValueError),
        "running_mean_size": ((2, 3), 4, 3, 3, 3, True, 1e-5, RuntimeError),
        "running_var_size": ((2, 3), 3, 4, 3, 3, True, 1e-5, RuntimeError),
        "weight_size": ((2, 3), 3, 3, 4, 3, True, 1e-5, RuntimeError),
        "bias_size": ((2, 3), 3, 3, 3, 4, True, 1e-5, RuntimeError),
        "weight_size_eval": ((2, 3, 4), 3, 3, 4, 3, False, 1e-5, RuntimeError),
        "running_mean_size_eval": ((2, 3, 4), 4, 3, 3, 3, False, 1e-5, RuntimeError),
        "eval_without_running_stats": ((2, 3), None, None, 3, 3, False, 1e-5, RuntimeError),
        "running_mean_alone": ((2, 3), 3, None, 3, 3, True, 1e-5, ValueError),  # torch: both or neither
        "running_var_alone": ((2, 3, 4), None, 3, None, None, True, 1e-5, ValueError),
        "running_var_alone_eval": ((2, 3), None, 3, 3, 3, False, 1e-5, RuntimeError),
        "one_dim": ((3,), 3, 3, 3, 3, True, 1e-5, RuntimeError),
        "one_dim_eval": ((3,), 3, 3, None, None, False, 1e-5, RuntimeError),
        "eps_zero": ((2, 3), 3, 3, 3, 3, True, 0.0, ValueError),
        "eps_negative": ((2, 3), 3, 3, 3, 3, True, -1e-5, ValueError),
        "eps_negative_eval": ((2, 3), 3, 3, 3, 3, False, -1e-5, ValueError),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input_raises_torchs_error_before_any_write(bn_impl, case):
    shape, nm, nv, nw, nb, training, eps, exc = _bad_cases()[case]
    device = _device(bn_impl)

    def t(n, fill):
        return None if n is None else torch.full((n,), fill, device=device)

    x = torch.randn(shape, device=device)
    rm, rv, w, b = t(nm, 0.5), t(nv, 2.0), t(nw, 1.5), t(nb, 0.25)
    with pytest.raises(exc) as ours:
        pyoptim.nn.functional.batch_norm(x, rm, rv, w, b, training, 0.1, eps, backend=bn_impl[1])
    for name, s, fill in (("running_mean", rm, 0.5), ("running_var", rv, 2.0)):
        if s is not None:
            assert torch.equal(s, torch.full_like(s, fill)), f"{name} changed before the error: {s}"
    if case.startswith("one_dim"):
        # torch has no message of its own for a 1-d input (it reports the running statistics' size, or
        # fails indexing dim 1); ours says what the input should be, the same from every backend.
        assert "expected input of shape (N, C, *), with at least 2 dims" in str(ours.value)
        return
    with pytest.raises(exc) as theirs:
        F.batch_norm(x, rm, rv, w, b, training, 0.1, eps)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("module", ["BatchNorm1d", "BatchNorm2d", "SyncBatchNorm"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("failure", ["one_value_per_channel", "eps_zero", "weight_size"])
def test_module_that_raises_writes_nothing(bn_impl, module, momentum, failure):
    """A training forward that raises leaves every buffer and parameter as it was: num_batches_tracked too
    (torch's increments it before raising; ours counts the step once the forward succeeded)."""
    device = _device(bn_impl)
    ours = getattr(pyoptim.nn, module)(3, momentum=momentum, device=device, backend=bn_impl[1])
    shape = (1, 3) if failure == "one_value_per_channel" else (4, 3)
    x = torch.randn(shape, device=device) if module == "BatchNorm1d" else torch.randn(*shape, 1, 1, device=device)
    with torch.no_grad():
        ours.running_mean.fill_(0.5)
        ours.running_var.fill_(2.0)
        ours.num_batches_tracked.fill_(7)
    if failure == "eps_zero":
        ours.eps = 0.0
    if failure == "weight_size":
        ours.weight = torch.nn.Parameter(torch.ones(4, device=device))
    before = copy.deepcopy(ours.state_dict())
    exc, match = {"one_value_per_channel": (ValueError, "Expected more than 1 value per channel when training"),
                  "eps_zero": (ValueError, "batch_norm eps must be positive during training"),
                  "weight_size": (RuntimeError, "weight")}[failure]
    with pytest.raises(exc, match=match):
        ours(x)
    for name, value in ours.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} changed before the error"
    if failure != "one_value_per_channel":
        return
    ours.eval()
    theirs = getattr(torch.nn, module)(3, device=device).eval()
    theirs.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(x), theirs(x), **TOL[torch.float32])  # eval: one sample is fine


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_module_counts_each_successful_step_as_torch(bn_impl, momentum):
    """num_batches_tracked and the cumulative average's 1 / num_batches_tracked factor as torch's, step by step."""
    device = _device(bn_impl)
    ours = pyoptim.nn.BatchNorm1d(3, momentum=momentum, device=device, backend=bn_impl[1])
    theirs = torch.nn.BatchNorm1d(3, momentum=momentum, device=device)
    for _ in range(3):
        x = torch.randn(8, 3, device=device)
        ours(x), theirs(x)
        assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)
        torch.testing.assert_close(ours.running_mean, theirs.running_mean, **TOL[torch.float32])
        torch.testing.assert_close(ours.running_var, theirs.running_var, **TOL[torch.float32])


# -- modules against torch's ------------------------------------------------------------------------------------


def _module_pair(cls: str, c: int, kwargs: dict, device, backend):
    """Ours and torch's module `cls`, torch's with random affine parameters and statistics, ours loaded from it."""
    theirs = getattr(torch.nn, cls)(c, device=device, **kwargs)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_()
        if theirs.running_mean is not None:
            theirs.running_mean.normal_()
            theirs.running_var.uniform_(0.5, 2.0)
    ours = getattr(pyoptim.nn, cls)(c, device=device, backend=backend, **kwargs)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _step_both(ours, theirs, x, dy, what):
    """One forward and backward of both modules; outputs, input grads, param grads and buffers compared."""
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), theirs(xb)
    torch.testing.assert_close(ya, yb, **_scaled_tol(yb), msg=lambda m: f"{what} out: {m}")
    ya.backward(dy)
    yb.backward(dy)
    torch.testing.assert_close(xa.grad, xb.grad, **_scaled_tol(xb.grad), msg=lambda m: f"{what} grad_input: {m}")
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **_scaled_tol(q.grad), msg=lambda m: f"{what} {name}.grad: {m}")
        p.grad, q.grad = None, None
    for (name, s), t in zip(ours.named_buffers(), theirs.buffers()):
        assert s.dtype == t.dtype, (what, name)
        torch.testing.assert_close(s, t, **_scaled_tol(t) if t.is_floating_point() else dict(rtol=0, atol=0),
                                   msg=lambda m: f"{what} {name}: {m}")


BN_MODULE_KWARGS = {
    "default": {},
    "momentum_none": dict(momentum=None),  # the cumulative average over the steps, 1 / num_batches_tracked
    "no_running_stats": dict(track_running_stats=False),  # batch statistics in eval too
    "no_affine": dict(affine=False),
    "no_bias": dict(bias=False),  # a weight alone
    "eps": dict(eps=1e-3, momentum=0.3),
}


@pytest.mark.parametrize("kwargs", list(BN_MODULE_KWARGS))
@pytest.mark.parametrize("cls,shape,layout", [
    ("BatchNorm1d", (6, 5), "nchw"),
    ("BatchNorm1d", (4, 5, 7), "nchw"),
    ("BatchNorm2d", (3, 5, 4, 6), "nchw"),
    ("BatchNorm2d", (3, 5, 4, 6), "channels_last"),
    ("BatchNorm3d", (2, 5, 3, 2, 4), "channels_last"),
], ids=lambda v: v if isinstance(v, str) else "x".join(map(str, v)))
def test_module_matches_torch(bn_impl, cls, shape, layout, kwargs):
    """Four training steps on batches of changing size (two under the interpreter: still a cumulative
    average that is not momentum's), then eval: outputs, grads, running statistics and num_batches_tracked
    as torch's module's."""
    device = _device(bn_impl)
    ours, theirs = _module_pair(cls, shape[1], BN_MODULE_KWARGS[kwargs], device, bn_impl[1])
    for step in range(2 if _interpreted(bn_impl) else 4):
        x = _input((shape[0] + step,) + shape[1:], layout, device=device)
        _step_both(ours, theirs, x, torch.randn_like(x), f"step {step}")
    ours.eval()
    theirs.eval()
    x = _input(shape, layout, device=device)
    _step_both(ours, theirs, x, torch.randn_like(x), "eval")


@pytest.mark.parametrize("cls", ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "InstanceNorm1d",
                                 "InstanceNorm2d", "InstanceNorm3d"])
@pytest.mark.parametrize("kwargs", [{}, dict(affine=False), dict(track_running_stats=False), dict(momentum=None),
                                    dict(affine=True, track_running_stats=True), dict(affine=True, bias=False)],
                         ids=["default", "no_affine", "no_running_stats", "momentum_none", "affine_and_stats",
                              "no_bias"])
def test_module_state_dict_interchange(cls, kwargs):
    """Same keys as torch's; a trained state_dict loads into either and the two compute the same; same repr.
    (The module's plumbing: the reference backend serves; the kernels are tested above.)"""
    ours = getattr(pyoptim.nn, cls)(4, **kwargs, backend="reference")
    theirs = getattr(torch.nn, cls)(4, **kwargs)
    if cls == "SyncBatchNorm":
        # note [not a torch SyncBatchNorm]: a _BatchNorm as torch's, so that DDP takes it in a CPU module
        assert isinstance(ours, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(ours, type(theirs))
    else:
        assert isinstance(ours, type(theirs))  # a subclass: isinstance checks in user code keep working
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert repr(ours) == repr(theirs)
    if kwargs.get("bias") is False:
        assert ours.bias is None and "bias" not in dict(ours.named_parameters())
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_()
    shape = {"1d": (6, 4, 5), "2d": (3, 4, 3, 3), "3d": (2, 4, 2, 3, 2)}.get(cls[-2:], (3, 4, 3, 3))
    theirs(torch.randn(shape))  # trained statistics
    theirs(torch.randn(shape))
    ours.load_state_dict(theirs.state_dict())
    for mode in ("train", "eval"):
        back = getattr(torch.nn, cls)(4, **kwargs)
        back.load_state_dict(ours.state_dict())
        for m in (ours, theirs, back):
            m.train(mode == "train")
        x = torch.randn(shape)
        ya, yb, yc = ours(x), theirs(x), back(x)
        torch.testing.assert_close(ya, yb, **TOL[torch.float32])
        torch.testing.assert_close(yc, yb, **TOL[torch.float32])
        for (name, s), t in zip(ours.state_dict().items(), theirs.state_dict().values()):
            torch.testing.assert_close(s, t, **TOL[torch.float32], msg=lambda m: f"{mode} {name}: {m}")


def test_module_dtype_device_and_backend_arguments():
    m = pyoptim.nn.BatchNorm2d(4, dtype=torch.float64, backend="reference")
    assert m.weight.dtype == torch.float64 and m.running_mean.dtype == torch.float64 and m.backend == "reference"
    assert m(torch.randn(2, 4, 3, 3, dtype=torch.float64)).dtype == torch.float64
    i = pyoptim.nn.InstanceNorm1d(4, affine=True, dtype=torch.float64, backend="reference")
    assert i.weight.dtype == torch.float64 and i.backend == "reference"


# -- InstanceNorm ---------------------------------------------------------------------------------------------

IN_KWARGS = {
    "default": {},
    "affine": dict(affine=True),
    "running_stats": dict(track_running_stats=True, momentum=0.3),
    "affine_and_stats": dict(affine=True, track_running_stats=True),
}


@pytest.mark.parametrize("kwargs", list(IN_KWARGS))
@pytest.mark.parametrize("cls,shape,layout", [
    ("InstanceNorm1d", (3, 5, 7), "nchw"),
    ("InstanceNorm1d", (5, 7), "nchw"),  # unbatched (C, L): torch adds and drops the batch dim
    ("InstanceNorm2d", (3, 5, 4, 6), "nchw"),
    ("InstanceNorm2d", (3, 5, 4, 6), "channels_last"),
    ("InstanceNorm2d", (1, 3, 2, 5), "nchw"),  # N = 1
    ("InstanceNorm3d", (2, 3, 3, 2, 4), "channels_last"),
], ids=lambda v: v if isinstance(v, str) else "x".join(map(str, v)))
def test_instance_norm_module_matches_torch(bn_impl, cls, shape, layout, kwargs):
    """Two training steps and eval: outputs, grads and (tracked) running statistics as torch's."""
    device = _device(bn_impl)
    c = shape[0] if len(shape) == 2 else shape[1]
    ours, theirs = _module_pair(cls, c, IN_KWARGS[kwargs], device, bn_impl[1])
    for step, mode in enumerate(("train", "train", "eval")):
        ours.train(mode == "train")
        theirs.train(mode == "train")
        x = _input(shape, layout, device=device) if len(shape) > 2 else torch.randn(shape, device=device) * 2 + 3
        _step_both(ours, theirs, x, torch.randn_like(x), f"step {step} ({mode})")


@pytest.mark.parametrize("shape,layout", _shape_params([
    ((2, 3, 5), "nchw"), ((3, 4, 3, 3), "channels_last"),
    ((1, 3, 2, 3, 4), "nchw"),  # N = 1, 5-d
]))
@pytest.mark.parametrize("use_input_stats,running", [(True, False), (True, True), (False, True)],
                         ids=["input_stats", "input_stats_and_running", "running_stats"])
def test_instance_norm_functional_matches_torch(bn_impl, shape, layout, use_input_stats, running):
    device = _device(bn_impl)
    x = _input(shape, layout, device=device)
    w, b, rm, rv = _params(shape[1], torch.float32, device, running=running)

    def ours(x, rm, rv, w, b, training, momentum, eps):
        return pyoptim.nn.functional.instance_norm(x, rm, rv, w, b, training, momentum, eps, backend=bn_impl[1])

    def theirs(x, rm, rv, w, b, training, momentum, eps):
        return F.instance_norm(x, rm, rv, w, b, training, momentum, eps)

    dy = torch.randn_like(x)
    a = _run(ours, x, rm, rv, w, b, dy, use_input_stats, 0.2)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    e = _run(theirs, d(x), d(rm), d(rv), d(w), d(b), d(dy), use_input_stats, 0.2)
    for name, u, v in zip(NAMES, a, e):
        if v is None:
            assert u is None, name
            continue
        v = v.float()
        torch.testing.assert_close(u, v, **_scaled_tol(v), msg=lambda m: f"{name}: {m}")
    # torch's instance_norm makes its input contiguous (a view as one sample of N * C channels), and so its
    # output: a channels-last input gives a contiguous output there, and here.
    assert a[0].stride() == theirs(x, rm, rv, w, b, use_input_stats, 0.2, 1e-5).stride()


@pytest.mark.parametrize("case", ["one_spatial_element", "no_stats_without_input_stats", "running_mean_size",
                                  "weight_size", "running_mean_alone"])
def test_instance_norm_bad_input_raises_torchs_error(bn_impl, case):
    device = _device(bn_impl)
    x = torch.randn(2, 3, 1 if case == "one_spatial_element" else 4, device=device)
    kw = {
        "one_spatial_element": {},
        "no_stats_without_input_stats": dict(use_input_stats=False),
        "running_mean_size": dict(running_mean=torch.zeros(4, device=device), running_var=torch.ones(4, device=device)),
        "weight_size": dict(weight=torch.ones(4, device=device)),
        "running_mean_alone": dict(running_mean=torch.zeros(3, device=device)),
    }[case]
    with pytest.raises(Exception) as theirs:
        F.instance_norm(x, **kw)
    with pytest.raises(theirs.type) as ours:
        pyoptim.nn.functional.instance_norm(x, **kw, backend=bn_impl[1])
    assert str(ours.value) == str(theirs.value)
    if "running_mean" in kw:
        assert torch.equal(kw["running_mean"], torch.zeros_like(kw["running_mean"]))


# -- replace_norms ---------------------------------------------------------------------------------------------


class _ConvNet(torch.nn.Module):
    """Conv-BN-ReLU, Conv-InstanceNorm-ReLU, pool, Linear-BatchNorm1d: every norm replace_norms swaps."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.Conv2d(8, 6, 3, padding=1), torch.nn.InstanceNorm2d(6, affine=True), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())
        self.head = torch.nn.Sequential(torch.nn.Linear(24, 5), torch.nn.BatchNorm1d(5, momentum=None))

    def forward(self, x):
        return self.head(self.features(x))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_replace_norms_on_a_conv_net(bn_impl, channels_last):
    """The swapped net computes what torch's does: outputs, every grad and the statistics, over two training
    steps and in eval. In float64: the grads of the layers before a norm cancel (a bias right before a norm
    has grad 0 in exact arithmetic), so float32 would compare two roundings of nothing; what is left in float64
    is a sum of ~1e3 terms' roundings, hence rtol/atol of 1e-9/1e-11 (a wrong kernel is off by 1e-4 or more)."""
    tol = lambda t: dict(rtol=1e-9, atol=1e-11 * max(1.0, float(t.detach().abs().max())))  # noqa: E731
    device = _device(bn_impl)
    torch.manual_seed(1)
    theirs = _ConvNet().to(device, torch.float64)
    with torch.no_grad():
        for m in theirs.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d, torch.nn.InstanceNorm2d)):
                m.weight.normal_()
                m.bias.normal_()
    if channels_last:
        theirs = theirs.to(memory_format=torch.channels_last)
    ours = copy.deepcopy(theirs)
    bn, inorm = ours.features[1], ours.features[4]
    weight, running_mean = bn.weight, bn.running_mean
    assert pyoptim.nn.replace_norms(ours, backend=bn_impl[1]) is ours
    assert type(ours.features[1]) is pyoptim.nn.BatchNorm2d and type(ours.features[4]) is pyoptim.nn.InstanceNorm2d
    assert type(ours.head[1]) is pyoptim.nn.BatchNorm1d and ours.head[1].momentum is None
    assert ours.features[1].backend == bn_impl[1] == ours.features[4].backend
    assert ours.features[4].affine and not ours.features[4].track_running_stats
    # The same Parameter and buffer objects: an optimizer built before the swap still updates them, and
    # anything holding the buffers (an EMA, DDP's buffer list) still sees the statistics move.
    assert ours.features[1].weight is weight and ours.features[1].running_mean is running_mean
    assert ours.features[4].weight is inorm.weight
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for step in range(2):
        x = torch.randn(4, 3, 6, 6, device=device, dtype=torch.float64)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        ya, yb = ours(x), theirs(x)
        torch.testing.assert_close(ya, yb, **tol(yb))
        dy = torch.randn_like(ya)
        ya.backward(dy)
        yb.backward(dy)
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
            torch.testing.assert_close(p.grad, q.grad, **tol(q.grad), msg=lambda m: f"{step} {name}: {m}")
            p.grad = q.grad = None
    for (name, s), t in zip(ours.state_dict().items(), theirs.state_dict().values()):
        torch.testing.assert_close(s, t, **(tol(t) if t.is_floating_point() else dict(rtol=0, atol=0)),
                                   msg=lambda m: f"{name}: {m}")
    ours.eval()
    theirs.eval()
    x = torch.randn(3, 3, 6, 6, device=device, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), **tol(theirs(x)))


def test_replace_norms_on_a_bare_norm_keeps_ours_and_dtype():
    m = torch.nn.BatchNorm2d(6, dtype=torch.float64)
    new = pyoptim.nn.replace_norms(m)
    assert type(new) is pyoptim.nn.BatchNorm2d and new.weight is m.weight and new.running_var is m.running_var
    assert new.weight.dtype == torch.float64
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), pyoptim.nn.BatchNorm2d(4, backend="reference"),
                                torch.nn.SyncBatchNorm(4, momentum=None, eps=1e-3))
    pyoptim.nn.replace_norms(model)
    assert model[1].backend == "reference"  # ours are left alone
    sync = model[2]
    assert type(sync) is pyoptim.nn.SyncBatchNorm and (sync.momentum, sync.eps, sync.process_group) == (None, 1e-3, None)


# -- the six ops: direct semantics, every backend against reference, opcheck, compile ------------------------------


def _stat_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _op_cases(device="cpu"):
    """(name, args) of each op: layouts, optional arguments, masks, mixed dtypes, and the empty edges."""
    ref = pyoptim.reference
    x = torch.randn(3, 5, 4, 3, device=device) * 2 + 3
    xc = x.contiguous(memory_format=torch.channels_last)
    x2 = torch.randn(6, 5, device=device)
    w, b, rm, rv = _params(5, torch.float32, device)
    _, mean, invstd, _, _ = ref.batch_norm_fwd_ref(x, w, b, rm, rv, True, 0.1, 1e-5)
    _, emean, einvstd, _, _ = ref.batch_norm_fwd_ref(x, w, b, rm, rv, False, 0.1, 1e-5)
    dy = torch.randn_like(x)
    count = x.numel() // 5
    sum_dy, sum_dy_xmu = ref.batch_norm_backward_reduce_ref(dy, x, mean)
    xb, dyb = x.bfloat16(), dy.bfloat16()
    mb, ib = ref.batch_norm_fwd_ref(xb, w, b, rm, rv, True, 0.1, 1e-5)[1:3]
    x0 = torch.randn(0, 5, 4, device=device)  # N = 0: count 0
    xs0 = torch.randn(2, 5, 0, device=device)  # S = 0: count 0 with a batch
    xc0 = torch.randn(2, 0, 4, device=device)  # C = 0: nothing per channel
    e0 = torch.empty(0, device=device)
    zeros, ones = torch.zeros(5, device=device), torch.ones(5, device=device)
    t, f = True, False
    return [
        ("batch_norm_fwd", (x, w, b, rm, rv, True, 0.1, 1e-5)),
        ("batch_norm_fwd", (xc, w, b, rm, rv, True, 0.1, 1e-5)),  # channels_last
        ("batch_norm_fwd", (x2, w, None, rm, rv, True, 0.3, 1e-3)),  # 2-d, weight without bias
        ("batch_norm_fwd", (x, None, None, None, None, True, 0.1, 1e-5)),  # nothing optional: new_running_* are [0]
        ("batch_norm_fwd", (x, w, b, rm, rv, False, 0.1, 1e-5)),  # eval: save_mean a copy of running_mean
        ("batch_norm_fwd", (xc, None, b, rm, rv, False, 0.1, 1e-5)),  # eval, channels-last, bias alone
        ("batch_norm_fwd", (xb, w, b, rm, rv, True, 0.1, 1e-5)),  # bf16 input, float32 parameters
        ("batch_norm_fwd", (xb, w.bfloat16(), b.bfloat16(), rm.bfloat16(), rv.bfloat16(), True, 0.1, 1e-5)),
        ("batch_norm_fwd", (x.double(), w.double(), b.double(), rm.double(), rv.double(), True, 0.1, 1e-5)),
        ("batch_norm_fwd", (x0, w, b, rm, rv, True, 0.1, 1e-5)),  # count 0: stats 0, running stats as given
        ("batch_norm_fwd", (xs0, w, b, rm, rv, True, 0.1, 1e-5)),
        ("batch_norm_fwd", (xc0, e0, e0, e0, e0, True, 0.1, 1e-5)),  # C = 0: all empty
        ("batch_norm_fwd", (xc0, None, None, e0, e0, False, 0.1, 1e-5)),
        ("batch_norm_bwd", (dy, x, w, mean, invstd, True, [t, t, t])),
        ("batch_norm_bwd", (dy, xc, w, mean, invstd, True, [t, t, t])),  # dy NCHW, x channels-last
        ("batch_norm_bwd", (dy, x, w, emean, einvstd, False, [t, f, t])),  # eval; grad_weight masked off
        ("batch_norm_bwd", (dy, x, None, mean, invstd, True, [t, t, t])),  # no weight: grad_weight [0], bias's sum(dy)
        ("batch_norm_bwd", (dy, x, w, mean, invstd, True, [f, t, f])),
        ("batch_norm_bwd", (dyb, xb, w, mb, ib, True, [t, t, t])),  # bf16, float32 weight: grads float32
        ("batch_norm_bwd", (torch.randn_like(x0), x0, w, zeros, zeros, True, [t, t, t])),  # count 0: zero grads
        ("batch_norm_bwd", (torch.randn_like(xc0), xc0, e0, e0, e0, True, [t, t, t])),
        ("batch_norm_stats", (x,)),
        ("batch_norm_stats", (xc,)),
        ("batch_norm_stats", (xb,)),  # bf16: float32 statistics
        ("batch_norm_stats", (xc0,)),
        ("batch_norm_elemt", (x, w, b, mean, invstd)),
        ("batch_norm_elemt", (xc, None, None, mean, invstd)),
        ("batch_norm_elemt", (xb, w, b, mb, ib)),
        ("batch_norm_elemt", (x0, w, b, zeros, ones)),
        ("batch_norm_backward_reduce", (dy, x, mean)),
        ("batch_norm_backward_reduce", (dy, xc, mean)),  # mixed layouts
        ("batch_norm_backward_reduce", (torch.randn_like(x0), x0, zeros)),  # count 0: zero sums
        ("batch_norm_backward_elemt", (dy, x, mean, invstd, w, sum_dy / count, sum_dy_xmu / count)),
        ("batch_norm_backward_elemt", (dy.contiguous(memory_format=torch.channels_last), xc, mean, invstd, None,
                                       sum_dy / count, sum_dy_xmu / count)),
        ("batch_norm_backward_elemt", (dyb, xb, mb, ib, w, sum_dy / count, sum_dy_xmu / count)),
    ]


def _op_ids():
    ids, seen = [], {}
    for name, _ in _op_cases():
        seen[name] = seen.get(name, -1) + 1
        ids.append(f"{name.removeprefix('batch_norm_')}-{seen[name]}")
    return ids


def _expected(name, args):
    """What the op must return, from torch (float64) and the ops' stated math, not from any backend."""
    def f64(t):
        return None if t is None else t.to(torch.float64, copy=True)  # a copy: native_batch_norm writes

    if name == "batch_norm_fwd":
        x, w, b, rm, rv, training, momentum, eps = args
        sd, pd = _stat_dtype(x.dtype), (rm.dtype if rm is not None else x.dtype)
        C, count = x.shape[1], x.numel() // max(x.shape[1], 1)
        empty = torch.empty(0, dtype=pd, device=x.device)
        if C == 0:
            e = torch.empty(0, dtype=sd, device=x.device)
            return [torch.empty_like(x), e, e, empty if rm is None or not training else rm.clone(),
                    empty if rv is None or not training else rv.clone()]
        if training and count == 0:
            z = torch.zeros(C, dtype=sd, device=x.device)
            return [torch.empty_like(x), z, z, rm.clone(), rv.clone()]
        xm, tm, tv = f64(x), f64(rm), f64(rv)
        if training:
            out, mean, invstd = torch.native_batch_norm(xm, f64(w), f64(b), tm, tv, True, momentum, eps)
        else:
            out = F.batch_norm(xm, tm, tv, f64(w), f64(b), False, momentum, eps)
            mean, invstd = tm, (tv + eps).rsqrt()
        new = [tm.to(pd), tv.to(pd)] if training and rm is not None else [empty, empty]
        return [out.to(x.dtype), mean.to(sd), invstd.to(sd)] + new
    if name == "batch_norm_bwd":
        dy, x, w, mean, invstd, training, mask = args
        wd = w.dtype if w is not None else x.dtype
        C = x.shape[1]
        if x.numel() == 0:
            dw = torch.zeros(C, dtype=wd, device=x.device)
            return [torch.empty_like(x) if mask[0] else torch.empty(0, dtype=x.dtype, device=x.device),
                    dw if mask[1] and w is not None else torch.empty(0, dtype=wd, device=x.device),
                    dw if mask[2] else torch.empty(0, dtype=wd, device=x.device)]
        var = (1 / f64(invstd) ** 2) - 1e-5  # native_batch_norm_backward's eval path takes running_var and eps
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(
            f64(dy), f64(x), f64(w), f64(mean), var, f64(mean), f64(invstd), training, 1e-5, [True, True, True])
        return [dx.to(x.dtype) if mask[0] else torch.empty(0, dtype=x.dtype, device=x.device),
                dw.to(wd) if mask[1] and w is not None else torch.empty(0, dtype=wd, device=x.device),
                db.to(wd) if mask[2] else torch.empty(0, dtype=wd, device=x.device)]
    dims = lambda x: [0] + list(range(2, x.dim()))  # noqa: E731
    if name == "batch_norm_stats":
        (x,) = args
        sd, C = _stat_dtype(x.dtype), x.shape[1]
        if C == 0:
            return [torch.empty(0, dtype=sd, device=x.device)] * 2
        var, mean = torch.var_mean(f64(x), dims(x), correction=0)
        return [mean.to(sd), (var * (x.numel() // max(C, 1))).to(sd)]
    shape = lambda x: [1, -1] + [1] * (x.dim() - 2)  # noqa: E731
    if name == "batch_norm_elemt":
        x, w, b, mean, invstd = args
        s = shape(x)
        out = (f64(x) - f64(mean).view(s)) * f64(invstd).view(s)
        out = out * f64(w).view(s) if w is not None else out
        out = out + f64(b).view(s) if b is not None else out
        return [out.to(x.dtype)]
    if name == "batch_norm_backward_reduce":
        dy, x, mean = args
        sd = _stat_dtype(x.dtype)
        xmu = f64(x) - f64(mean).view(shape(x))
        return [f64(dy).sum(dims(x)).to(sd), (f64(dy) * xmu).sum(dims(x)).to(sd)]
    if name == "batch_norm_backward_elemt":
        dy, x, mean, invstd, w, mean_dy, mean_dy_xmu = args
        s = shape(x)
        inv = f64(invstd).view(s)
        xmu = f64(x) - f64(mean).view(s)
        dx = (f64(dy) - f64(mean_dy).view(s) - xmu * inv * inv * f64(mean_dy_xmu).view(s)) * inv
        dx = dx * f64(w).view(s) if w is not None else dx
        return [dx.to(x.dtype)]
    raise AssertionError(name)


def _low_tol(t: torch.Tensor) -> dict:
    # bf16 outputs: one rounding of the float32 result (plus the input's own). Others: TOL, scaled.
    if t.dtype in (torch.bfloat16, torch.float16):
        return dict(rtol=1.6e-2, atol=1e-2 * max(1.0, float(t.abs().max())) if t.numel() else 1e-2)
    return _scaled_tol(t)


def _check_op_outputs(what, ours, expected, args):
    ours = list(ours) if isinstance(ours, (tuple, list)) else [ours]
    assert len(ours) == len(expected), what
    x = args[1] if what[1] in ("batch_norm_bwd", "batch_norm_backward_reduce", "batch_norm_backward_elemt") else args[0]
    for i, (a, e) in enumerate(zip(ours, expected)):
        assert a.shape == e.shape and a.dtype == e.dtype and a.device == e.device, (what, i, a.shape, e.shape,
                                                                                     a.dtype, e.dtype)
        if a.shape == x.shape and a.dim() > 1:
            _assert_layout(a, x, f"{what} output {i}")
        torch.testing.assert_close(a, e, **_low_tol(e), equal_nan=True, msg=lambda m: f"{what} output {i}: {m}")


@pytest.mark.parametrize("case", range(len(_op_cases())), ids=_op_ids())
def test_op_semantics(bn_impl, case):
    """Each op through each backend (the reference included) against its stated math, computed in float64 from
    torch's own native_batch_norm(_backward) where it has one: shapes, dtypes, layouts, masks, empties."""
    name, args = _op_cases(_device(bn_impl).type)[case]
    args_before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    ours = _backends.get(name, bn_impl[1])(*args)
    _check_op_outputs((bn_impl[1], name), ours, _expected(name, args), args)
    for a, a0 in zip(args, args_before):  # functional: no argument written
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, a0), (name, "an argument changed")


def test_every_backend_agrees_with_reference():
    """Backends against the reference itself, op by op: same shapes, dtypes, layouts, and values to TOL."""
    for device_type, backend in impls("batch_norm_fwd"):
        if backend == "reference":
            continue
        for name, args in _op_cases(device_type):
            ref = getattr(pyoptim.reference, name + "_ref")(*args)
            _check_op_outputs((backend, name), _backends.get(name, backend)(*args),
                              list(ref) if isinstance(ref, (tuple, list)) else [ref], args)


def test_sync_pieces_compose_to_the_fused_ops(bn_impl):
    """stats -> elemt and backward_reduce -> backward_elemt, with one process's counts, give batch_norm_fwd's
    output and batch_norm_bwd's grads (what SyncBatchNorm computes with a world of one)."""
    device = _device(bn_impl)
    get = lambda op: _backends.get(op, bn_impl[1])  # noqa: E731
    x = _input((4, 6, 3, 5), "channels_last", device=device)
    w, b, _, _ = _params(6, torch.float32, device)
    dy = torch.randn_like(x)
    count = x.numel() // 6
    mean, m2 = get("batch_norm_stats")(x)
    invstd = (m2 / count + 1e-5).rsqrt()
    out, smean, sinvstd, _, _ = get("batch_norm_fwd")(x, w, b, None, None, True, 0.1, 1e-5)
    torch.testing.assert_close(mean, smean, **_scaled_tol(smean))
    torch.testing.assert_close(invstd, sinvstd, **_scaled_tol(sinvstd))
    torch.testing.assert_close(get("batch_norm_elemt")(x, w, b, mean, invstd), out, **_scaled_tol(out))
    sum_dy, sum_dy_xmu = get("batch_norm_backward_reduce")(dy, x, mean)
    dx, dw, db = get("batch_norm_bwd")(dy, x, w, mean, invstd, True, [True, True, True])
    torch.testing.assert_close(sum_dy, db, **_scaled_tol(db))
    torch.testing.assert_close(sum_dy_xmu * invstd, dw, **_scaled_tol(dw))
    dx2 = get("batch_norm_backward_elemt")(dy, x, mean, invstd, w, sum_dy / count, sum_dy_xmu / count)
    torch.testing.assert_close(dx2, dx, **_scaled_tol(dx))


def _compiled_backends():
    return [(d, b) for d, b in impls("batch_norm_fwd") if b in ("cpu", "cuda")] if _backends.EXTENSION_LOADED else []


@pytest.mark.skipif(not _backends.EXTENSION_LOADED, reason="the extension is not built")
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if HAS_CUDA else []))
@pytest.mark.parametrize("case", range(len(_op_cases())), ids=_op_ids())
def test_opcheck(device, case):
    name, args = _op_cases(device)[case]
    if name == "batch_norm_fwd":
        # The differentiable inputs: input, weight, bias (not the running statistics).
        args = tuple(a.requires_grad_() if i < 3 and isinstance(a, torch.Tensor) and a.is_floating_point() else a
                     for i, a in enumerate(args))
    torch.library.opcheck(getattr(torch.ops.pyoptim, name), args)


@pytest.mark.skipif(not _backends.EXTENSION_LOADED, reason="the extension is not built")
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if HAS_CUDA else []))
def test_compile_fullgraph_equals_eager(device):
    """BatchNorm2d forward and backward under torch.compile(fullgraph=True): outputs, grads and the running
    statistics written back (two training steps, then eval) as in eager mode."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = pyoptim.nn.BatchNorm2d(6, device=device, backend=device)
    with torch.no_grad():
        eager.weight.normal_()
        eager.bias.normal_()
    comp = copy.deepcopy(eager)

    def f(m, x):
        return torch.relu(m(x) * 2).sum((2, 3))

    compiled = torch.compile(lambda x: f(comp, x), fullgraph=True, backend="aot_eager")
    for step, mode in enumerate(("train", "train", "eval")):
        eager.train(mode == "train")
        comp.train(mode == "train")
        x = torch.randn(4, 6, 5, 5, device=device)
        if step == 1:
            x = x.contiguous(memory_format=torch.channels_last)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = f(eager, xa), compiled(xb)
        torch.testing.assert_close(yb, ya, **TOL[torch.float32])
        ya.sum().backward()
        yb.sum().backward()
        torch.testing.assert_close(xb.grad, xa.grad, **TOL[torch.float32])
        for (name, p), q in zip(eager.named_parameters(), comp.parameters()):
            torch.testing.assert_close(q.grad, p.grad, **TOL[torch.float32], msg=lambda m: f"{step} {name}: {m}")
            p.grad = q.grad = None
        for (name, s), t in zip(eager.named_buffers(), comp.buffers()):
            torch.testing.assert_close(t, s, **TOL[torch.float32], msg=lambda m: f"{step} {name}: {m}")


@pytest.mark.skipif(not _backends.EXTENSION_LOADED, reason="the extension is not built")
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if HAS_CUDA else []))
def test_compiled_autograd_equals_eager(device):
    """The C++ autograd (note [C++ autograd]) under compiled autograd: the backward is captured, grads as eager."""
    bn = pyoptim.nn.BatchNorm2d(6, device=device)
    x = torch.randn(4, 6, 5, 5, device=device, requires_grad=True)
    assert_compiled_autograd_equals_eager(lambda: (bn(x) * 2).square().sum().backward(), [x, bn.weight, bn.bias])


@pytest.mark.skipif(not _backends.EXTENSION_LOADED, reason="the extension is not built")
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if HAS_CUDA else []))
def test_autocast_matches_torch(device):
    """No autocast policy touches batch_norm (note [autocast]): under autocast a bf16 input gives a bf16 output,
    as torch's does."""
    x = _input((4, 3, 5, 5), "nchw", torch.bfloat16, device)
    w, b, rm, rv = _params(3, torch.float32, device)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = pyoptim.nn.functional.batch_norm(x, rm.clone(), rv.clone(), w, b, True)
        ty = F.batch_norm(x, rm.clone(), rv.clone(), w, b, True)
    assert y.dtype == ty.dtype == torch.bfloat16
    torch.testing.assert_close(y, ty, rtol=1.6e-2, atol=2e-2)


@pytest.mark.skipif(not _backends.EXTENSION_LOADED, reason="the extension is not built")
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_export_equals_eager(training):
    """torch.export of a conv + BatchNorm2d: outputs as eager, and in training the running statistics and
    num_batches_tracked moved as eager moves them."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), pyoptim.nn.BatchNorm2d(6)).train(training)
    twin = copy.deepcopy(net)
    x = torch.randn(4, 3, 8, 8)
    ep = torch.export.export(net, (x,))
    assert "pyoptim.batch_norm_fwd" in ep.graph_module.code
    exported = ep.module()
    torch.testing.assert_close(exported(x), twin(x), **TOL[torch.float32])
    if training:
        for name, buf in twin[1].named_buffers():
            torch.testing.assert_close(exported.get_buffer(f"1.{name}"), buf, msg=lambda m: f"{name}: {m}")


# -- CUDA only --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cuda_statistics_match_reference(backend, dtype, layout):
    # Large per-channel counts (many blocks per channel) on the GPU, against the reference on the CPU.
    if backend not in _backends.available("batch_norm_fwd", "cuda"):
        pytest.skip(f"{backend} is not built here")
    x = _input((64, 24, 28, 28), layout, dtype)
    w, b, rm, rv = _params(24, torch.float32, "cpu")
    gpu = _backends.get("batch_norm_fwd", backend)(*(t.cuda() for t in (x, w, b, rm, rv)), True, 0.1, 1e-5)
    cpu = pyoptim.reference.batch_norm_fwd_ref(x, w, b, rm, rv, True, 0.1, 1e-5)
    for i, (a, e) in enumerate(zip(gpu, cpu)):
        assert a.dtype == e.dtype and a.shape == e.shape, i
        torch.testing.assert_close(a.cpu(), e, **_low_tol(e), msg=lambda m: f"{i}: {m}")
    _assert_layout(gpu[0], x, "out")
