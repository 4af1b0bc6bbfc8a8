"""LayerNorm / RMSNorm: every backend against torch (F.layer_norm, F.rms_norm), the ops, and the nn API."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import pyoptim
from pyoptim import _backends
from tests.conftest import HAS_CUDA, TOL, assert_compiled_autograd_equals_eager, assert_grads_of_some_leaves, requires_cuda

ROWS = [1, 3, 257]  # one row; fewer rows than threads; more rows than backward blocks, odd
# 1: a row of one element (var 0); 7: no whole 16-byte vector; 128: one warp's
# vectors exactly; 1023: vectors plus a tail; 4096: the largest one-tile row
# (Triton); 65536: far past every in-register path (the multi-pass ones).
NS = [1, 7, 128, 1023, 4096, 65536]


def _device(impl):
    return torch.device("cuda" if impl[0] == "cuda" else "cpu")


def _interpreted(impl) -> bool:
    return impl[1] == "triton" and impl[0] == "cpu"


def _ours(rms, backend):
    if rms:
        return lambda x, shape, w, b, eps: pyoptim.nn.functional.rms_norm(x, shape, w, eps, backend=backend)
    return lambda x, shape, w, b, eps: pyoptim.nn.functional.layer_norm(x, shape, w, b, eps, backend=backend)


def _theirs(rms):
    if rms:
        return lambda x, shape, w, b, eps: F.rms_norm(x, shape, w, eps)
    return lambda x, shape, w, b, eps: F.layer_norm(x, shape, w, b, eps if eps is not None else 1e-5)


def _run(fn, x, shape, w, b, eps, dy):
    """Output and the grads of (x, w, b) under fn, on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    y = fn(leaves[0], shape, leaves[1], leaves[2], eps)
    y.backward(dy)
    return [y.detach()] + [t.grad if t is not None else None for t in leaves]


def _scaled_tol(expected: torch.Tensor) -> dict:
    """TOL, with atol relative to the tensor's largest magnitude: a sum's rounding
    (a row's statistics, a column's weight grad) is relative to its terms, and
    the result can cancel to near 0."""
    tol = TOL[expected.dtype]
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    return dict(rtol=tol["rtol"], atol=tol["atol"] * scale)


def _assert_matches_torch(impl, rms, x, shape, w, b, eps=1e-5, tol=None, dx_atol=None):
    """Output and grads against torch's, run in float64 and rounded to x's dtype.

    float64 because torch's own float32 path is not exact where rstd amplifies
    rounding: for N = 1 its xhat = x * rstd - mean * rstd leaves a residue of
    ~1e-5 where the exact xhat (and so grad_weight) is 0.
    """
    dy = torch.randn_like(x)
    ours = _run(_ours(rms, impl[1]), x, shape, w, b, eps, dy)
    exact = _run(_theirs(rms), x.double(), shape, *(t.double() if t is not None else None for t in (w, b)), eps,
                 dy.double())
    theirs = [t.to(x.dtype if i < 2 else w.dtype) if t is not None else None for i, t in enumerate(exact)]
    for name, a, e in zip(("out", "grad_input", "grad_weight", "grad_bias"), ours, theirs):
        if e is None:
            assert a is None, name
            continue
        assert a.dtype == e.dtype and a.shape == e.shape, (name, a.dtype, e.dtype, a.shape, e.shape)
        t = tol or _scaled_tol(e)
        if name == "grad_input" and dx_atol is not None:
            t = dict(t, atol=max(t["atol"], dx_atol))
        torch.testing.assert_close(a, e, **t, msg=lambda m: f"{name}: {m}")


def _affine(n_shape, dtype, device, rms):
    w = torch.randn(n_shape, dtype=dtype, device=device)
    b = None if rms else torch.randn(n_shape, dtype=dtype, device=device)
    return w, b


# -- against torch: the row x N grid ---------------------------------------------


def _grid():
    for m in ROWS:
        for n in NS:
            yield m, n


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("m,n", list(_grid()), ids=lambda v: str(v))
def test_matches_torch(norm_impl, rms, dtype, m, n):
    if _interpreted(norm_impl) and m == 257 and n == 65536:
        # The interpreter runs each program in Python: 257 long rows take
        # minutes. (3, 65536) still covers the multi-pass path, and (257, 4096)
        # the grid-strided backward with many rows per program.
        pytest.skip("too slow under TRITON_INTERPRET; covered by (3, 65536) and the GPU run")
    device = _device(norm_impl)
    # A mean far from 0: catches a one-pass E[x^2] - E[x]^2 variance.
    x = torch.randn(m, n, dtype=dtype, device=device) * 2 + 3
    w, b = _affine((n,), dtype, device, rms)
    if n == 1 and not rms:
        # A row of one is its own mean: xhat is exactly 0, so y = b, dw = 0,
        # db = dy, and dx = rstd * (g - c1) = 0 with c1 = g. torch leaves a
        # residue in dw (x * rstd - mean * rstd, rounding amplified by
        # rstd = 1 / sqrt(eps)); the exact values are the oracle. dx is
        # exactly 0 too: no backend lets the compiler fuse g - c1 into
        # fma(dy, w, -c1), which would leave the rounding of dy * w times rstd
        # (setup.py's -ffp-contract=off, Triton's enable_fp_fusion=False).
        dy = torch.randn_like(x)
        y, dx, dw, db = _run(_ours(rms, norm_impl[1]), x, (n,), w, b, 1e-5, dy)
        torch.testing.assert_close(y, b.expand(m, 1), rtol=0, atol=0)
        torch.testing.assert_close(dx, torch.zeros_like(x), rtol=0, atol=0)
        torch.testing.assert_close(dw, torch.zeros_like(w), rtol=0, atol=0)
        torch.testing.assert_close(db, dy.sum(0), **TOL[dtype])
        return
    dx_atol = None
    if n == 1:
        # RMSNorm of one element: dx = rstd * g * (1 - xhat^2) cancels to
        # ~g * eps / x^2; what is left is the rounding of its terms, ~rstd * g.
        dx_atol = 4 * (x.abs().min().item() ** -1) * w.abs().max().item() * 4 * torch.finfo(dtype).eps
    _assert_matches_torch(norm_impl, rms, x, (n,), w, b, dx_atol=dx_atol)


# -- degenerate rows: no worse than torch's own error ---------------------------------


def _degenerate(case: str, m: int, n: int) -> torch.Tensor:
    """[m, n] float64 rows that stress the statistics: constant, one repeated value per row, huge, tiny."""
    g = torch.Generator().manual_seed(n)
    if case == "constant":
        return torch.full((m, n), 3.7, dtype=torch.float64)
    if case == "repeated":  # each row one value of its own, sign and size varying by row
        return (torch.randn(m, 1, generator=g, dtype=torch.float64) * 10).expand(m, n).contiguous()
    scale = {"huge": 1e18, "tiny": 1e-18, "huge_offset": 1.0}[case]
    x = torch.randn(m, n, generator=g, dtype=torch.float64) * scale
    if case == "huge_offset":
        x = x + 1e4  # a mean far larger than the spread: catches E[x^2] - E[x]^2
    return x


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("case", ["constant", "repeated", "huge", "tiny", "huge_offset"])
@pytest.mark.parametrize("n", [1, 7, 1023, 4096], ids=str)
def test_degenerate_rows_vs_float64(norm_impl, rms, case, n):
    """Each output's error against a float64 run of the fp32 inputs is at most 2x torch's fp32 error,
    plus a few ulps of the output's scale (where torch's own error is 0)."""
    device = _device(norm_impl)
    m = 5
    x = _degenerate(case, m, n).float().to(device)
    w, b = _affine((n,), torch.float32, device, rms)
    dy = torch.randn(m, n, device=device)
    ours = _run(_ours(rms, norm_impl[1]), x, (n,), w, b, 1e-5, dy)
    theirs = _run(_theirs(rms), x, (n,), w, b, 1e-5, dy)
    exact = _run(_theirs(rms), x.double().cpu(), (n,), *(t.double().cpu() if t is not None else None for t in (w, b)),
                 1e-5, dy.double().cpu())
    ulp = torch.finfo(torch.float32).eps
    for name, a, t, e in zip(("out", "grad_input", "grad_weight", "grad_bias"), ours, theirs, exact):
        if e is None:
            continue
        assert torch.isfinite(a).all(), (name, a)
        err_ours = float((a.double().cpu() - e).abs().max())
        err_torch = float((t.double().cpu() - e).abs().max())
        # The rounding of the output itself, and of rstd-scaled sums over the row
        # (LayerNorm's dx over a constant row is rstd * (g - mean(g)): terms of 1/sqrt(eps)).
        floor = 8 * ulp * max(float(e.abs().max()), 1.0) * (n if name == "grad_weight" else 1)
        assert err_ours <= 2 * err_torch + floor, (name, err_ours, err_torch, floor)


# -- bf16/fp16: no worse than torch's own error -------------------------------------


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("m,n", [(257, 1023), (3, 65536), (64, 128)], ids=str)
def test_low_precision_vs_float64(norm_impl, rms, dtype, m, n):
    """Each output's error against a float64 run is at most twice torch's (fp32 math, one rounding per output)."""
    if _interpreted(norm_impl) and m * n > 3 * 65536:
        pytest.skip("too slow under TRITON_INTERPRET")
    device = _device(norm_impl)
    x = (torch.randn(m, n, device=device) * 2 + 3).to(dtype)
    w, b = (t.to(dtype) if t is not None else None for t in _affine((n,), torch.float32, device, rms))
    dy = torch.randn(m, n, device=device).to(dtype)
    eps = 1e-5
    ours = _run(_ours(rms, norm_impl[1]), x, (n,), w, b, eps, dy)
    # torch's own on this device, and exact: float64 on the CPU.
    theirs = _run(_theirs(rms), x, (n,), w, b, eps, dy)
    exact = _run(_theirs(rms), x.double().cpu(), (n,), *(t.double().cpu() if t is not None else None for t in (w, b)),
                 eps, dy.double().cpu())

    def err(a, e):
        return float((a.double().cpu() - e).norm() / e.norm().clamp_min(1e-30))

    # The interpreter rounds fp32 -> bf16 by truncation (DESIGN.md): one ulp
    # per output, not twice torch's round-to-nearest error.
    factor = 4.0 if _interpreted(norm_impl) and dtype == torch.bfloat16 else 2.0
    for name, a, t, e in zip(("out", "grad_input", "grad_weight", "grad_bias"), ours, theirs, exact):
        if e is None:
            continue
        assert a.dtype == t.dtype
        e_ours, e_torch = err(a, e), err(t, e)
        assert e_ours <= factor * e_torch + 1e-6, (name, e_ours, e_torch)


# -- shapes, layouts, dtypes -------------------------------------------------------


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_3d_input_and_2d_normalized_shape(norm_impl, rms):
    device = _device(norm_impl)
    x = torch.randn(2, 5, 6, 7, device=device)
    w, b = _affine((6, 7), torch.float32, device, rms)
    _assert_matches_torch(norm_impl, rms, x, (6, 7), w, b)  # N = 42 over two dims
    x3 = torch.randn(4, 3, 33, device=device)
    w, b = _affine((33,), torch.float32, device, rms)
    _assert_matches_torch(norm_impl, rms, x3, (33,), w, b)  # two leading dims, N = 33


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("affine", ["none", "weight_only"])
def test_without_affine(norm_impl, rms, affine):
    device = _device(norm_impl)
    x = torch.randn(5, 40, device=device)
    w = None if affine == "none" else torch.randn(40, device=device)
    _assert_matches_torch(norm_impl, rms, x, (40,), w, None)


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_non_contiguous_input(norm_impl, rms):
    device = _device(norm_impl)
    n = 24
    w, b = _affine((n,), torch.float32, device, rms)
    base = torch.randn(n, 9, device=device)
    _assert_matches_torch(norm_impl, rms, base.t(), (n,), w, b)  # transposed: row stride 1
    sliced = torch.randn(6, 2 * n, device=device)[:, ::2]  # every other column: gaps
    _assert_matches_torch(norm_impl, rms, sliced, (n,), w, b)
    # A non-contiguous grad_out too.
    x = torch.randn(6, n, device=device)
    dy = torch.randn(n, 6, device=device).t()
    ours = _run(_ours(rms, norm_impl[1]), x, (n,), w, b, 1e-5, dy)
    theirs = _run(_theirs(rms), x, (n,), w, b, 1e-5, dy)
    for a, e in zip(ours, theirs):
        if e is not None:
            torch.testing.assert_close(a, e, **TOL[torch.float32])


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_mixed_dtypes(norm_impl, rms, dtype):
    """Low-precision input, float32 weight and bias: output and grad_input in the input's dtype, weight grads in float32."""
    device = _device(norm_impl)
    x = torch.randn(9, 130, device=device).to(dtype)
    w, b = _affine((130,), torch.float32, device, rms)
    dy = torch.randn(9, 130, device=device).to(dtype)
    ours = _run(_ours(rms, norm_impl[1]), x, (130,), w, b, 1e-5, dy)
    # The oracle: float32 math on the same values.
    exact = _run(_theirs(rms), x.float(), (130,), w, b, 1e-5, dy.float())
    assert ours[0].dtype == dtype and ours[1].dtype == dtype and ours[2].dtype == torch.float32
    low = dict(rtol=1e-2, atol=1e-2)  # one rounding to bf16/fp16 of the outputs; weight grads stay fp32
    torch.testing.assert_close(ours[0].float(), exact[0], **low)
    torch.testing.assert_close(ours[1].float(), exact[1], **low)
    torch.testing.assert_close(ours[2], exact[2], rtol=1e-4, atol=1e-4)
    if not rms:
        torch.testing.assert_close(ours[3], exact[3], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_gradcheck_float64(norm_impl, rms):
    device = _device(norm_impl)
    x = torch.randn(3, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, device=device, requires_grad=True)
    b = None if rms else torch.randn(4, 5, dtype=torch.float64, device=device, requires_grad=True)
    fn = _ours(rms, norm_impl[1])
    inputs = (x, w) if rms else (x, w, b)
    assert torch.autograd.gradcheck(lambda *t: fn(t[0], (4, 5), t[1], t[2] if len(t) > 2 else None, 1e-5), inputs)


# Which leaves require grad (x, weight, bias), and which of weight/bias are given: the backward's
# output_mask comes from both, and each affine argument may be absent.
_SUBSETS = [
    (False, "x"), (False, "weight"), (False, "bias"), (False, "weight,bias"), (False, "x,bias"),
    (False, "x,bias;no_weight"), (False, "bias;no_weight"),
    (True, "x"), (True, "weight"), (True, "x,weight"),
]


@pytest.mark.parametrize("rms,case", _SUBSETS, ids=lambda v: str(v))
def test_grads_of_some_leaves_only(norm_impl, rms, case):
    """Only the leaves that require grad get one, each equal to torch's."""
    device = _device(norm_impl)
    need, _, given = case.partition(";")
    need = need.split(",")
    x = torch.randn(6, 24, dtype=torch.float64, device=device)
    w, b = _affine((24,), torch.float64, device, rms)
    if given == "no_weight":
        w = None
    ours, theirs = (lambda x_, w_, b_, fn=fn: fn(x_, (24,), w_, b_, 1e-5) for fn in (_ours(rms, norm_impl[1]),
                                                                                   _theirs(rms)))
    assert_grads_of_some_leaves(ours, theirs, dict(x=x, weight=w, bias=b), need, torch.randn_like(x))


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_torch_func_grad_and_per_sample_grads(norm_impl, rms):
    """torch.func.grad and vmap(grad)'s per-sample grads (note [torch.func]) against torch's; the Triton backend,
    whose launchers take raw pointers, refuses with a clear error."""
    device = _device(norm_impl)
    x = torch.randn(5, 16, dtype=torch.float64, device=device)
    w, b = _affine((16,), torch.float64, device, rms)

    def loss(fn):
        return lambda x, w, b: (fn(x, (16,), w, b, 1e-5) ** 2).sum()

    ours, theirs = loss(_ours(rms, norm_impl[1])), loss(_theirs(rms))
    args = (0, 1) if rms else (0, 1, 2)
    if norm_impl[1] == "triton":  # raw pointers: refused with a clear error
        with pytest.raises(RuntimeError, match="cannot run inside torch.func"):
            torch.func.grad(ours, args)(x, w, b)
        return
    for a, e in zip(torch.func.grad(ours, args)(x, w, b), torch.func.grad(theirs, args)(x, w, b)):
        torch.testing.assert_close(a, e)
    per_sample = [torch.func.vmap(torch.func.grad(f, args), in_dims=(0, None, None))(x[:, None], w, b)
                  for f in (ours, theirs)]
    for a, e in zip(*per_sample):
        torch.testing.assert_close(a, e)


def test_double_backward_raises(norm_impl):
    """No second derivative: a clear error, not zeros (torch's message for an op without a derivative)."""
    device = _device(norm_impl)
    x = torch.randn(4, 8, device=device, requires_grad=True)
    w = torch.randn(8, device=device, requires_grad=True)
    y = pyoptim.nn.functional.layer_norm(x, (8,), w, None, backend=norm_impl[1])
    (g,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
    # (the Triton ops' backward op has no formula of its own: note [triton ops])
    with pytest.raises(RuntimeError, match="not implemented|once_differentiable|no autograd formula"):
        g.sum().backward()


def test_weight_grads_are_deterministic(norm_impl):
    device = _device(norm_impl)
    m, n = (64, 300) if _interpreted(norm_impl) else (4096, 300)
    x = torch.randn(m, n, device=device)
    w, b = _affine((n,), torch.float32, device, False)
    dy = torch.randn(m, n, device=device)
    first = _run(_ours(False, norm_impl[1]), x, (n,), w, b, 1e-5, dy)
    second = _run(_ours(False, norm_impl[1]), x, (n,), w, b, 1e-5, dy)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_rms_norm_default_eps_is_torchs(norm_impl, dtype):
    """eps=None is the math dtype's epsilon, as aten's rms_norm takes it: float32's
    for bf16/fp16 input too (bfloat16's own, 2^-7, moved outputs by ~1.7 here)."""
    device = _device(norm_impl)
    # Mean square near the default eps: the default matters.
    x = (torch.randn(4, 16, device=device) * (1e-4 if dtype == torch.float32 else 0.05)).to(dtype)
    dy = torch.randn_like(x)
    # torch in the same dtype: in float64 the default eps would be float64's.
    ours = _run(_ours(True, norm_impl[1]), x, (16,), None, None, None, dy)
    theirs = _run(_theirs(True), x, (16,), None, None, None, dy)
    for a, e in zip(ours[:2], theirs[:2]):
        if dtype == torch.float32:
            torch.testing.assert_close(a, e, **_scaled_tol(e))
        else:
            # One rounding to the 8/11-bit mantissa apart (two under the
            # interpreter's truncation), against the ~100% moved by eps = 2^-7.
            ulp = float(torch.finfo(dtype).eps)
            torch.testing.assert_close(a.float(), e.float(), rtol=2 * ulp, atol=2 * ulp * float(e.float().abs().max()))


@pytest.mark.parametrize("in_dtype,w_dtype", [(torch.float32, torch.float64), (torch.float32, torch.bfloat16),
                                               (torch.bfloat16, torch.float16), (torch.float64, torch.float32)],
                         ids=str)
def test_rms_norm_takes_any_floating_weight_as_torch(norm_impl, in_dtype, w_dtype):
    """torch's rms_norm takes a weight of another floating dtype (its composite path): the output in the input's
    dtype, the weight's grad in the weight's (found by the differential tests: ours raised)."""
    device = _device(norm_impl)
    x = torch.randn(5, 24, device=device).to(in_dtype)
    w = torch.randn(24, device=device).to(w_dtype)
    dy = torch.randn(5, 24, device=device).to(in_dtype)
    ours = _run(_ours(True, norm_impl[1]), x, (24,), w, None, 1e-5, dy)
    theirs = _run(_theirs(True), x, (24,), w, None, 1e-5, dy)
    # bf16/fp16 anywhere: torch promotes before it rounds, ours casts the weight first; a 16-bit ulp apart.
    low = torch.bfloat16 in (in_dtype, w_dtype) or torch.float16 in (in_dtype, w_dtype)
    for a, e in zip(ours[:3], theirs[:3]):
        assert a.dtype == e.dtype
        torch.testing.assert_close(a.float(), e.float(), **(dict(rtol=2e-2, atol=2e-2) if low else TOL[torch.float32]))


# -- bad shapes: torch's errors -----------------------------------------------------


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("case", ["input_shape", "weight_shape", "bias_shape", "empty_shape", "too_few_dims"])
def test_bad_shapes_raise_torchs_errors(norm_impl, rms, case):
    if rms and case == "bias_shape":
        pytest.skip("RMSNorm has no bias")
    device = _device(norm_impl)
    x = torch.randn(2, 3, 4, device=device)
    shape, w, b = (4,), torch.ones(4, device=device), None if rms else torch.zeros(4, device=device)
    if case == "input_shape":
        shape, w, b = (5,), None, None
    elif case == "weight_shape":
        w = torch.ones(3, device=device)
    elif case == "bias_shape":
        b = torch.ones(3, device=device)
    elif case == "empty_shape":
        shape, w, b = (), None, None
    elif case == "too_few_dims":
        shape, w, b = (1, 2, 3, 4), None, None
    with pytest.raises(RuntimeError) as ours:
        _ours(rms, norm_impl[1])(x, shape, w, b, 1e-5)
    if rms and case == "too_few_dims":
        # torch raises a ValueError of its own here ("Input tensor must have at
        # least 4 dimensions"); ours stays a RuntimeError with the message torch
        # gives for any other mismatch of the trailing dims.
        assert str(ours.value).startswith("Given normalized_shape=[1, 2, 3, 4], expected input with shape [*1, 2, 3, 4]")
        return
    with pytest.raises(RuntimeError) as theirs:
        _theirs(rms)(x, shape, w, b, 1e-5)
    assert str(ours.value) == str(theirs.value)


def test_bad_dtype_and_device_messages_name_the_op():
    x = torch.randn(2, 4)
    with pytest.raises(RuntimeError, match=r"layer_norm_fwd: weight has dtype Double but input has dtype Float"):
        pyoptim.nn.functional.layer_norm(x, (4,), torch.ones(4, dtype=torch.float64), backend="reference")
    if _backends.EXTENSION_LOADED:
        with pytest.raises(RuntimeError, match=r"layer_norm_fwd: weight has dtype Double but input has dtype Float"):
            pyoptim.nn.functional.layer_norm(x, (4,), torch.ones(4, dtype=torch.float64), backend="cpu")
        with pytest.raises(RuntimeError, match=r"rms_norm_fwd: input has dtype Int"):
            torch.ops.pyoptim.rms_norm_fwd(torch.ones(2, 4, dtype=torch.int32), [4], None, None)


# -- the ops: opcheck, compile, backends -----------------------------------------------


def _op_cases(device="cpu"):
    x = torch.randn(3, 5, 7, device=device)
    w, b = torch.randn(5, 7, device=device), torch.randn(5, 7, device=device)
    out, mean, rstd = pyoptim.reference.layer_norm_fwd_ref(x, [5, 7], w, b, 1e-5)
    _, rrstd = pyoptim.reference.rms_norm_fwd_ref(x, [5, 7], w, None)
    dy = torch.randn_like(x)
    xb = x.bfloat16()
    return [
        ("layer_norm_fwd", (x, [5, 7], w, b, 1e-5)),
        ("layer_norm_fwd", (x, [7], None, None, 1e-5)),
        ("layer_norm_fwd", (xb, [5, 7], w, b, 1e-5)),  # mixed dtypes
        ("layer_norm_bwd", (dy, x, [5, 7], mean, rstd, w, b, [True, True, True])),
        ("layer_norm_bwd", (dy, x, [5, 7], mean, rstd, w, b, [True, False, True])),
        ("layer_norm_bwd", (dy, x, [5, 7], mean, rstd, None, None, [True, True, True])),
        ("rms_norm_fwd", (x, [5, 7], w, None)),
        ("rms_norm_fwd", (x, [5, 7], None, 1e-3)),
        ("rms_norm_bwd", (dy, x, [5, 7], rrstd, w, [True, True])),
        ("rms_norm_bwd", (dy, x, [5, 7], rrstd, w, [False, True])),
    ]


@pytest.mark.skipif(not _backends.EXTENSION_LOADED, reason="the extension is not built")
@pytest.mark.parametrize("case", range(len(_op_cases())))
def test_opcheck(case):
    name, args = _op_cases()[case]
    if name.endswith("_fwd"):
        args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) and a.dtype == torch.float32 else a
                     for a in args)
    torch.library.opcheck(getattr(torch.ops.pyoptim, name), args)


def test_every_backend_agrees_with_reference():
    # The ops' contracts (output shapes and dtypes, masks, empty outputs)
    # through each backend against reference directly.
    from tests.conftest import impls
    for device_type, backend in impls("layer_norm_fwd"):
        for name, args in _op_cases(device_type):
            ours = _backends.get(name, backend)(*args)
            ref = getattr(pyoptim.reference, name + "_ref")(*args)
            assert len(ours) == len(ref)
            for a, e in zip(ours, ref):
                assert a.shape == e.shape and a.dtype == e.dtype, (backend, name, a.shape, e.shape, a.dtype, e.dtype)
                # bf16 outputs: one rounding apart at most (torch's default bf16 tolerance).
                torch.testing.assert_close(a, e, **TOL.get(a.dtype, {}))


@pytest.mark.skipif(not _backends.EXTENSION_LOADED, reason="the extension is not built")
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if HAS_CUDA else []))
def test_compile_fullgraph_equals_eager(device):
    torch._dynamo.reset()
    x = torch.randn(4, 6, 32, device=device)
    ln = pyoptim.nn.LayerNorm(32, device=device)
    rms = pyoptim.nn.RMSNorm([6, 32], device=device)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
        rms.weight.normal_()

    def f(x):
        return rms(ln(x) * 2).sum(-1)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = f(xa), compiled(xb)
    torch.testing.assert_close(ya, yb, **TOL[torch.float32])
    ya.sum().backward()
    grads_a = [xa.grad] + [p.grad.clone() for p in (ln.weight, ln.bias, rms.weight)]
    for p in (ln.weight, ln.bias, rms.weight):
        p.grad = None
    yb.sum().backward()
    grads_b = [xb.grad] + [p.grad for p in (ln.weight, ln.bias, rms.weight)]
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


@pytest.mark.skipif(not _backends.EXTENSION_LOADED, reason="the extension is not built")
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if HAS_CUDA else []))
def test_compiled_autograd_equals_eager(device):
    """The C++ autograd (note [C++ autograd]) under compiled autograd: the backward is captured, grads as eager."""
    ln = pyoptim.nn.LayerNorm(32, device=device)
    rms = pyoptim.nn.RMSNorm(32, device=device)
    x = torch.randn(4, 6, 32, device=device, requires_grad=True)
    assert_compiled_autograd_equals_eager(lambda: rms(ln(x) * 2).square().sum().backward(),
                                          [x, ln.weight, ln.bias, rms.weight])


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_autocast_matches_torch(norm_impl, rms, in_dtype):
    """Under autocast the output's dtype and value are torch's (note [autocast]: CUDA runs both norms in
    float32, CPU leaves them in the input's dtype), and the input's grad comes back in its own dtype."""
    device = _device(norm_impl).type
    x = torch.randn(6, 32, device=device).to(in_dtype)
    w, b = _affine((32,), torch.float32, device, rms)
    dy = torch.randn(6, 32, device=device)
    outs = []
    for fn in (_ours(rms, norm_impl[1]), _theirs(rms)):
        leaf = x.detach().clone().requires_grad_()
        with torch.autocast(device, dtype=torch.bfloat16):
            y = fn(leaf, (32,), w, b, 1e-5)
        y.backward(dy.to(y.dtype))
        outs.append((y.detach(), leaf.grad))
    (y, dx), (ty, tdx) = outs
    assert y.dtype == ty.dtype and dx.dtype == tdx.dtype == in_dtype
    for name, a, e in (("out", y, ty), ("grad_input", dx, tdx)):
        # float32: the same math; bfloat16: each rounds a float32 result (an ulp or two apart at most).
        tol = TOL[torch.float32] if a.dtype == torch.float32 else dict(rtol=1.6e-2, atol=2e-2)
        torch.testing.assert_close(a, e, **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.skipif(not _backends.EXTENSION_LOADED, reason="the extension is not built")
def test_cuda_autocast_policy_is_torchs():
    """The ops with a CUDA autocast kernel are those whose aten twins have one (checked without a GPU)."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    for ours, theirs in [("layer_norm_fwd", "layer_norm"), ("rms_norm_fwd", "rms_norm"),
                         ("batch_norm_fwd", "batch_norm")]:
        assert has(f"pyoptim::{ours}", "AutocastCUDA") == has(f"aten::{theirs}", "AutocastCUDA"), ours


@pytest.mark.skipif(not _backends.EXTENSION_LOADED, reason="the extension is not built")
def test_export_equals_eager():
    """torch.export of a block with our LayerNorm and RMSNorm: the ops appear in the graph, outputs as eager."""
    block = torch.nn.Sequential(torch.nn.Linear(16, 32), pyoptim.nn.LayerNorm(32), torch.nn.GELU(),
                                pyoptim.nn.RMSNorm(32))
    x = torch.randn(4, 16)
    ep = torch.export.export(block, (x,))
    code = ep.graph_module.code
    assert "pyoptim.layer_norm_fwd" in code and "pyoptim.rms_norm_fwd" in code
    torch.testing.assert_close(ep.module()(x), block(x), **TOL[torch.float32])


# -- the nn API ------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{}, dict(bias=False), dict(elementwise_affine=False), dict(eps=1e-3)],
                         ids=["default", "no_bias", "no_affine", "eps"])
def test_layer_norm_module_state_dict_interchange(kwargs):
    ours = pyoptim.nn.LayerNorm((3, 8), **kwargs)
    theirs = torch.nn.LayerNorm((3, 8), **kwargs)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    if kwargs.get("bias") is False:
        assert ours.bias is None and "bias" not in dict(ours.named_parameters())
    if ours.weight is not None:
        with torch.no_grad():
            for p in theirs.parameters():
                p.normal_()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(ours(x), theirs(x), **TOL[torch.float32])
    back = torch.nn.LayerNorm((3, 8), **kwargs)
    back.load_state_dict(ours.state_dict())
    torch.testing.assert_close(back(x), ours(x), **TOL[torch.float32])
    assert repr(ours) == repr(theirs)


@pytest.mark.parametrize("kwargs", [{}, dict(elementwise_affine=False), dict(eps=1e-3)],
                         ids=["default", "no_affine", "eps"])
def test_rms_norm_module_state_dict_interchange(kwargs):
    ours, theirs = pyoptim.nn.RMSNorm(8, **kwargs), torch.nn.RMSNorm(8, **kwargs)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    if ours.weight is not None:
        with torch.no_grad():
            theirs.weight.normal_()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(5, 8)
    torch.testing.assert_close(ours(x), theirs(x), **TOL[torch.float32])
    back = torch.nn.RMSNorm(8, **kwargs)
    back.load_state_dict(ours.state_dict())
    torch.testing.assert_close(back(x), ours(x), **TOL[torch.float32])


def test_module_dtype_and_device_arguments():
    m = pyoptim.nn.LayerNorm(4, dtype=torch.float64, backend="reference")
    assert m.weight.dtype == torch.float64 and m.backend == "reference"
    assert m(torch.randn(2, 4, dtype=torch.float64)).dtype == torch.float64


class _Block(torch.nn.Module):
    """A small pre-norm transformer block: attention and an MLP, a LayerNorm and an RMSNorm."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(d)
        self.attn = torch.nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm2 = torch.nn.RMSNorm(d)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(), torch.nn.Linear(4 * d, d))
        self.final = torch.nn.Sequential(torch.nn.LayerNorm(d, bias=False))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.mlp(self.norm2(x))
        return self.final(x)


def test_replace_norms_on_a_transformer_block(norm_impl):
    device = _device(norm_impl)
    torch.manual_seed(1)
    theirs = _Block().to(device)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "norm" in name or "final" in name:
                p.normal_()
    ours = copy.deepcopy(theirs)
    weight_before = ours.norm1.weight
    assert pyoptim.nn.replace_norms(ours, backend=norm_impl[1]) is ours
    assert type(ours.norm1) is pyoptim.nn.LayerNorm and type(ours.norm2) is pyoptim.nn.RMSNorm
    assert type(ours.final[0]) is pyoptim.nn.LayerNorm and ours.final[0].bias is None
    assert ours.norm1.weight is weight_before  # the same Parameter: an optimizer built before still works
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(2, 5, 32, device=device)
    ya, yb = ours(x), theirs(x)
    torch.testing.assert_close(ya, yb, **TOL[torch.float32])
    dy = torch.randn_like(ya)
    ya.backward(dy)
    yb.backward(dy)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_replace_norms_on_a_bare_norm_and_keeps_dtype():
    m = torch.nn.LayerNorm(6, dtype=torch.float64)
    new = pyoptim.nn.replace_norms(m)
    assert type(new) is pyoptim.nn.LayerNorm and new.weight is m.weight and new.weight.dtype == torch.float64
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), pyoptim.nn.LayerNorm(6, backend="reference"))
    pyoptim.nn.replace_norms(model)
    assert model[1].backend == "reference"  # ours are left alone


# -- CUDA only -------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_statistics_match_reference(backend, dtype):
    # The output and statistics the GPU saves, against the reference's, for the same rows.
    if backend not in _backends.available("layer_norm_fwd", "cuda"):
        pytest.skip(f"{backend} is not built here")
    x = torch.randn(300, 2000, dtype=dtype) * 3 + 1
    gpu = _backends.get("layer_norm_fwd", backend)(x.cuda(), [2000], None, None, 1e-5)
    cpu = pyoptim.reference.layer_norm_fwd_ref(x, [2000], None, None, 1e-5)
    for a, e in zip(gpu, cpu):
        torch.testing.assert_close(a.cpu().float(), e.float(), rtol=1e-5, atol=1e-5 if dtype == torch.float32 else 1e-2)
