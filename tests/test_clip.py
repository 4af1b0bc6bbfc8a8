"""Gradient clipping: clip_grad_norm_ / clip_grad_value_ and the multi-tensor norm against torch and float64."""

from __future__ import annotations

import math

import pytest
import torch

import pyoptim
from pyoptim.nn.utils import clip_grad_norm_, clip_grad_value_
from tests.conftest import device_of

NORM_TYPES = [2.0, 1.0, math.inf, 3.5, 0.5]


def params_with_grads(shapes, device, dtype=torch.float32, scale=1.0, make=None):
    out = []
    for s in shapes:
        p = torch.zeros(s, dtype=dtype, device=device, requires_grad=True)
        p.grad = (make(s) if make else torch.randn(s, dtype=dtype, device=device) * scale)
        out.append(p)
    return out


def _twins(params):
    twins = []
    for p in params:
        q = p.detach().clone().requires_grad_()
        q.grad = p.grad.clone()
        twins.append(q)
    return twins


@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=str)
@pytest.mark.parametrize("max_norm", [0.5, 1e4], ids=["clipped", "below_max"])
def test_clip_grad_norm_matches_torch(clip_impl, norm_type, max_norm):
    device = device_of(clip_impl)
    # 0-d and one-element grads, a vector width +- 1, a 2-D grad.
    ours = params_with_grads([(), (1,), (15,), (17,), (33,), (4, 5)], device)
    theirs = _twins(ours)
    total = clip_grad_norm_(ours, max_norm, norm_type, backend=clip_impl[1])
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type, foreach=False)
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=0)
    assert total.dtype == torch.float32 and total.dim() == 0 and total.device.type == device.type
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


def test_clip_grad_norm_odd_layouts(clip_impl):
    device = device_of(clip_impl)
    ours = [torch.zeros(5, 7, device=device, requires_grad=True), torch.zeros(6, 4, device=device, requires_grad=True)]
    ours[0].grad = torch.randn(7, 5, device=device).t()         # dense, transposed
    ours[1].grad = torch.randn(6, 12, device=device)[:, ::3]    # not dense
    theirs = _twins(ours)
    for p, q in zip(ours, theirs):
        q.grad = p.grad.clone()
    total = clip_grad_norm_(ours, 0.3, backend=clip_impl[1])
    expected = torch.nn.utils.clip_grad_norm_(theirs, 0.3)
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=0)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=str)
def test_empty_and_missing_grads(clip_impl, norm_type):
    device = device_of(clip_impl)
    ps = params_with_grads([(0,), (3,), (0, 4)], device)
    ps.append(torch.zeros(2, device=device, requires_grad=True))  # no grad: skipped
    # torch's inf-norm raises on an empty grad; ours is the max of the rest.
    total = clip_grad_norm_(ps, 1e4, norm_type, backend=clip_impl[1])
    torch.testing.assert_close(total, torch.linalg.vector_norm(ps[1].grad, norm_type))
    assert clip_grad_norm_([torch.zeros(2, requires_grad=True)], 1.0) == 0  # no grads at all


def test_mixed_dtypes(clip_impl):
    device = device_of(clip_impl)
    ps = params_with_grads([(10,)], device) + params_with_grads([(7,)], device, torch.float64)
    theirs = _twins(ps)
    total = clip_grad_norm_(ps, 0.5, backend=clip_impl[1])
    expected = torch.nn.utils.clip_grad_norm_(theirs, 0.5)
    torch.testing.assert_close(total.double(), expected.double(), rtol=1e-6, atol=0)
    for p, q in zip(ps, theirs):
        torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_grads_do_not_overflow(clip_impl, dtype):
    device = device_of(clip_impl)
    # Each element fits fp16, their norm (about 1.9e6) does not.
    ps = params_with_grads([(1000,)], device, dtype, make=lambda s: torch.full(s, 60000.0, dtype=dtype, device=device))
    value = float(ps[0].grad[0])  # 60000 rounded to the dtype
    total = clip_grad_norm_(ps, 1.0, backend=clip_impl[1])
    exact = value * math.sqrt(1000)
    assert abs(float(total) - exact) <= 1e-5 * exact
    # The clipped grads: value / exact, rounded to the dtype.
    torch.testing.assert_close(ps[0].grad.float(), torch.full((1000,), value / exact, device=device),
                               rtol=1e-2, atol=0)


def test_large_tensor_accuracy(clip_impl):
    """Within 1e-5 of float64 at any size (torch's CPU fp32 norm of 2^28 ones returns 11585 for 16384)."""
    device = device_of(clip_impl)
    # 2^27 elements; the Triton interpreter runs every program in Python, so it gets 2^22.
    n = 2**22 if clip_impl[1] == "triton" and device.type == "cpu" else 2**27
    for make in (torch.ones, torch.randn):
        x = make(n, device=device) if make is torch.ones else torch.randn(n, device=device) * 3 + 1
        total, per = pyoptim.functional.multi_tensor_norm([x], 2.0, backend=clip_impl[1])
        exact = float(torch.linalg.vector_norm(x.double()))
        assert abs(float(total) - exact) <= 1e-5 * exact, (float(total), exact)
        assert abs(float(per[0]) - exact) <= 1e-5 * exact
        del x


def test_error_if_nonfinite(clip_impl):
    device = device_of(clip_impl)
    ps = params_with_grads([(4,), (3,)], device)
    ps[1].grad[1] = float("nan")
    before = [p.grad.clone() for p in ps]
    with pytest.raises(RuntimeError, match="is non-finite, so it cannot be clipped"):
        clip_grad_norm_(ps, 1.0, error_if_nonfinite=True, backend=clip_impl[1])
    for p, g in zip(ps, before):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0, equal_nan=True)
    total = clip_grad_norm_(ps, 1.0, backend=clip_impl[1])  # as torch: scaled by the NaN norm
    assert total.isnan() and ps[0].grad.isnan().all()


def test_per_tensor_norms(clip_impl):
    device = device_of(clip_impl)
    ts = [torch.randn(s, device=device) for s in [(300,), (), (0,), (70000,)]]
    for p in NORM_TYPES:
        total, per = pyoptim.functional.multi_tensor_norm(ts, p, backend=clip_impl[1])
        ref_total, ref_per = pyoptim.reference.multi_tensor_norm_ref(ts, p)
        torch.testing.assert_close(per, ref_per, rtol=1e-5, atol=0)
        torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=0)


def test_norm_bad_input():
    with pytest.raises(RuntimeError, match="norm_type must be positive"):
        pyoptim.functional.multi_tensor_norm([torch.ones(3)], 0.0)
    with pytest.raises(RuntimeError, match=r"tensors\[1\] has dtype"):
        pyoptim.functional.multi_tensor_norm([torch.ones(3), torch.ones(3, dtype=torch.float64)], 2.0)


def test_clip_grad_value_matches_torch():
    ours = params_with_grads([(10,), (3, 3)], "cpu", scale=3.0)
    theirs = _twins(ours)
    clip_grad_value_(ours, 1.5)
    torch.nn.utils.clip_grad_value_(theirs, 1.5)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


@pytest.mark.skipif(not pyoptim._backends.EXTENSION_LOADED, reason="the extension is not built")
def test_opcheck_and_compile():
    ts = [torch.randn(5), torch.randn(2, 3), torch.randn(())]
    torch.library.opcheck(torch.ops.pyoptim.multi_tensor_norm, (ts, 2.0))
    torch.library.opcheck(torch.ops.pyoptim.multi_tensor_norm, (ts, math.inf))
    torch.library.opcheck(torch.ops.pyoptim.clip_scale_, ([t.clone() for t in ts], torch.tensor(10.0), 1.0))
    a, b = [t.clone() for t in ts], [t.clone() for t in ts]

    def clip(xs):
        total, _ = torch.ops.pyoptim.multi_tensor_norm(xs, 2.0)
        torch.ops.pyoptim.clip_scale_(xs, total, 1.0)
        return total

    got = torch.compile(clip, fullgraph=True, backend="aot_eager")(a)
    want = clip(b)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_norm_over_hundreds_of_tensors_and_nan(clip_impl):
    device = device_of(clip_impl)
    # 700 tensors: more than one CUDA launch holds (320), several chunks each for some. The Triton interpreter
    # (a minute over 700) gets 340: still more than a launch holds.
    n = 340 if clip_impl[1] == "triton" and device.type == "cpu" else 700
    ts = [torch.randn(int(s), device=device) for s in torch.randint(0, 3000, (n,))]
    for p in (2.0, math.inf, 1.0):
        total, per = pyoptim.functional.multi_tensor_norm(ts, p, backend=clip_impl[1])
        ref_total, ref_per = pyoptim.reference.multi_tensor_norm_ref(ts, p)
        torch.testing.assert_close(per, ref_per, rtol=1e-5, atol=0)
        torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=0)
    k = next(i for i in range(n // 2, n) if ts[i].numel())
    ts[k][0] = float("nan")  # NaN propagates, through the max of the inf-norm too
    for p in (2.0, math.inf):
        total, per = pyoptim.functional.multi_tensor_norm(ts, p, backend=clip_impl[1])
        assert total.isnan() and per[k].isnan() and not per[k - 1].isnan()


def test_clip_scale_factor_one_leaves_grads_bitwise(clip_impl):
    device = device_of(clip_impl)
    ts = [torch.randn(100, device=device), torch.randn(3, 3, device=device)]
    before = [t.clone() for t in ts]
    # max_norm far above the norm: the factor is exactly 1 (and the pass may be skipped).
    pyoptim.functional.clip_scale_(ts, torch.tensor(5.0, device=device), 1e6, backend=clip_impl[1])
    for t, b in zip(ts, before):
        torch.testing.assert_close(t, b, rtol=0, atol=0)
    pyoptim.functional.clip_scale_(ts, torch.tensor(20.0, device=device), 2.0, backend=clip_impl[1])
    coef = 2.0 / (20.0 + 1e-6)
    for t, b in zip(ts, before):
        torch.testing.assert_close(t, b * coef, rtol=1e-6, atol=0)
