"""Randomized differential tests: every backend of every op and module against torch and a float64 run.

Hypothesis draws shapes (0, 1, odd and prime sizes, rows wider than 65,536),
dtypes, layouts (non-contiguous, channels_last, expanded), hyperparameters and
backends; each result must stay within a stated multiple of torch's own error
against float64, and a bad input must raise torch's error type and write
nothing. Seeded (derandomized) and bounded for `make test`; a longer run:

    PYOPTIM_HYPOTHESIS=long make test ARGS="tests/test_differential.py"

Every failure this suite found is kept as an ordinary regression test in the
op's own test file (see the README's note on it there).
"""

from __future__ import annotations

import copy
import functools
import os

import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")  # make test installs it; a bare `pip install pyoptim` need not
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import pyoptim  # noqa: E402
from tests.conftest import impls  # noqa: E402

settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("long", max_examples=2000, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_PROFILE = os.environ.get("PYOPTIM_HYPOTHESIS", "ci")

LOW = (torch.bfloat16, torch.float16)


def _profile(max_examples: int | None = None):
    """This module's profile, with fewer examples in CI where one example is slow."""
    if _PROFILE != "ci" or max_examples is None:
        return settings(settings.get_profile(_PROFILE))
    return settings(settings.get_profile(_PROFILE), max_examples=max_examples)


def _seeded(test):
    """Seed torch before each example, so that a replayed (shrunk) example draws the same tensors."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        torch.manual_seed(0)
        return test(*args, **kwargs)
    return run


def _device(impl) -> torch.device:
    return torch.device("cuda" if impl[0] == "cuda" else "cpu")


def _interpreted(impl) -> bool:
    return impl[1] == "triton" and impl[0] == "cpu"


def _rel_err(a: torch.Tensor, e: torch.Tensor) -> float:
    """||a - e|| / ||e|| in float64 (0 when both are 0)."""
    a, e = a.double().cpu(), e.double().cpu()
    num = float((a - e).norm())
    den = float(e.norm())
    return num / den if den > 0 else num


def _bound(dtype: torch.dtype, impl) -> tuple[float, float]:
    """(multiple of torch's error, floor in units of the dtype's epsilon) that a result must stay within.

    2x torch's error: ours rounds once per output as torch does, from fp32 math
    (fp64 for fp64). The floor covers outputs where torch happens to be exact
    (an error of 0). The interpreter truncates fp32 -> bf16 (DESIGN.md): its
    bf16 outputs carry up to twice the rounding error of round-to-nearest.
    """
    factor = 4.0 if (_interpreted(impl) and dtype == torch.bfloat16) else 2.0
    return factor, 16.0


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x's values in the named memory layout."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "transposed":  # the last dim strided
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced":  # every other column of a wider tensor
        wide = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        return wide[..., ::2]
    if layout == "expanded":  # one row, read by every row (stride 0)
        return x[..., :1, :].expand(x.shape)
    raise AssertionError(layout)


def _run(fn, tensors, dy):
    """fn's output and the grads of its floating leaves (None where not given), on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    y = fn(*leaves)
    if y.numel():
        y.backward(dy)
    return [y.detach()] + [t.grad if t is not None and y.numel() else None for t in leaves]


def _oracle(fn, tensors, dy):
    """(fn in float64 on the CPU, each output's sensitivity to its inputs' last bits).

    The sensitivity is the relative change of each output when every input moves
    by a few float64 ulps: in float64 torch's own run is the oracle (its error is
    0 by construction), so an output that cancels (a batch of two, a constant
    row) is held to the noise its own conditioning makes, not to 0.
    """
    f64 = [t.double().cpu() if t is not None else None for t in tensors]
    exact = _run(fn, f64, dy.double().cpu())
    g = torch.Generator().manual_seed(1)

    def nudge(t):
        return t * (1 + 4 * torch.finfo(torch.float64).eps * torch.randn(t.shape, generator=g, dtype=torch.float64))

    moved = _run(fn, [nudge(t) if t is not None else None for t in f64], nudge(dy.double().cpu()))
    noise = [_rel_err(m, e) if e is not None and m is not None else 0.0 for m, e in zip(moved, exact)]
    return exact, noise


def _assert_close_to_exact(names, ours, theirs, exact, dtype, impl, noise=None):
    factor, floor_ulps = _bound(dtype, impl)
    eps = float(torch.finfo(dtype).eps)
    noise = noise or [0.0] * len(names)
    for name, a, t, e, z in zip(names, ours, theirs, exact, noise):
        if e is None or t is None:
            continue
        assert a is not None, name
        assert a.dtype == t.dtype and a.shape == t.shape, (name, a.dtype, t.dtype, a.shape, t.shape)
        assert torch.isfinite(a).all() or not torch.isfinite(e).all(), (name, "not finite")
        err_ours, err_torch = _rel_err(a, e), _rel_err(t, e)
        assert err_ours <= factor * max(err_torch, z) + floor_ulps * eps, (name, err_ours, err_torch, z)


# -- LayerNorm / RMSNorm --------------------------------------------------------------

_NORM_IMPLS = impls("layer_norm_fwd")
_NS = [1, 2, 3, 7, 13, 31, 128, 257, 1000, 4099]


@st.composite
def _norm_cases(draw):
    impl = draw(st.sampled_from(_NORM_IMPLS))
    rms = draw(st.booleans())
    # Rows wider than 65,536 (the multi-pass paths) on the compiled backends;
    # the interpreter runs each program in Python.
    ns = _NS + ([65537, 70001] if not _interpreted(impl) else [])
    n = draw(st.sampled_from(ns))
    m = draw(st.sampled_from([0, 1, 2, 3, 5, 17] if n > 4099 else [0, 1, 2, 3, 5, 17, 64]))
    lead = draw(st.sampled_from([(m,), (1, m), (2, max(m // 2, 1))])) if m > 1 else (m,)
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
    layout = draw(st.sampled_from(["contiguous", "transposed", "sliced", "expanded"]))
    affine = draw(st.sampled_from(["none", "weight", "both"]))
    if rms and affine == "both":
        affine = "weight"
    eps = draw(st.sampled_from([1e-5, 1e-3, 1e-12] + ([None] if rms else [])))
    offset = draw(st.sampled_from([0.0, 3.0, 100.0]))
    w_dtype = draw(st.sampled_from([dtype, torch.float32]))
    return dict(impl=impl, rms=rms, shape=(*lead, n), dtype=dtype, layout=layout, affine=affine, eps=eps,
                offset=offset, w_dtype=w_dtype)


def _norm_fns(rms, backend, eps, n):
    if rms:
        ours = lambda x, w, b: pyoptim.nn.functional.rms_norm(x, (n,), w, eps, backend=backend)  # noqa: E731
        theirs = lambda x, w, b: F.rms_norm(x, (n,), w, eps)  # noqa: E731
    else:
        ours = lambda x, w, b: pyoptim.nn.functional.layer_norm(x, (n,), w, b, eps, backend=backend)  # noqa: E731
        theirs = lambda x, w, b: F.layer_norm(x, (n,), w, b, eps)  # noqa: E731
    return ours, theirs


@_profile(max_examples=40)
@given(case=_norm_cases())
@_seeded
def test_norm_vs_torch_and_float64(case):
    impl, rms, shape, dtype = case["impl"], case["rms"], case["shape"], case["dtype"]
    device, n = _device(impl), shape[-1]
    if _interpreted(impl) and torch.Size(shape).numel() > 70_000:
        return  # the interpreter's cost; the compiled backends draw these
    x = _layout((torch.randn(shape, device=device) * 2 + case["offset"]).to(dtype), case["layout"])
    w = torch.randn(n, device=device).to(case["w_dtype"]) if case["affine"] != "none" else None
    b = torch.randn(n, device=device).to(case["w_dtype"]) if case["affine"] == "both" else None
    if (w is not None and w.dtype != dtype) and dtype != torch.float32:
        w = w.to(dtype)  # torch's mixed dtypes: fp32 params with a low-precision input only
        b = b.to(dtype) if b is not None else None
    dy = torch.randn(shape, device=device).to(dtype)
    eps = case["eps"]
    ours_fn, theirs_fn = _norm_fns(rms, impl[1], eps, n)
    ours = _run(ours_fn, (x, w, b), dy)
    theirs = _run(theirs_fn, (x, w, b), dy)
    # The float64 oracle with the eps torch applied: eps=None is the math dtype's epsilon (float32's below float64).
    exact_eps = eps if eps is not None else float(torch.finfo(torch.float64 if dtype == torch.float64
                                                              else torch.float32).eps)
    _, exact_fn = _norm_fns(rms, impl[1], exact_eps, n)
    exact, noise = _oracle(exact_fn, (x, w, b), dy)
    _assert_close_to_exact(("out", "grad_input", "grad_weight", "grad_bias"), ours, theirs, exact, dtype, impl,
                           noise)


@_profile(max_examples=25)
@given(impl=st.sampled_from(_NORM_IMPLS), rms=st.booleans(),
       bad=st.sampled_from(["weight_size", "bias_size", "normalized_shape", "weight_dtype", "too_few_dims"]))
@_seeded
def test_norm_bad_input_raises_torchs_error_type(impl, rms, bad):
    device = _device(impl)
    x = torch.randn(3, 8, device=device)
    w, b, shape = torch.randn(8, device=device), torch.randn(8, device=device), (8,)
    if bad == "weight_size":
        w = torch.randn(7, device=device)
    elif bad == "bias_size":
        b = torch.randn(9, device=device)
    elif bad == "normalized_shape":
        shape = (9,)
    elif bad == "weight_dtype":
        w = w.double()
    elif bad == "too_few_dims":
        shape = (3, 8, 1)
    if rms and bad == "bias_size":
        return  # RMSNorm has no bias
    ours = (lambda: pyoptim.nn.functional.rms_norm(x, shape, w, None, backend=impl[1])) if rms else \
        (lambda: pyoptim.nn.functional.layer_norm(x, shape, w, b, 1e-5, backend=impl[1]))
    theirs = (lambda: F.rms_norm(x, shape, w, None)) if rms else (lambda: F.layer_norm(x, shape, w, b, 1e-5))
    try:
        theirs()
        expected = None
    except Exception as e:  # noqa: BLE001 - the type is what is compared
        expected = type(e)
    if expected is None:
        ours()  # torch accepts it (e.g. a float64 weight under type promotion): so must we
        return
    with pytest.raises(expected):
        ours()


# -- BatchNorm / InstanceNorm ---------------------------------------------------------

_BN_IMPLS = impls("batch_norm_fwd")


@st.composite
def _bn_cases(draw):
    impl = draw(st.sampled_from(_BN_IMPLS))
    dims = draw(st.sampled_from([0, 1, 2, 3]))  # spatial dims: BatchNorm1d (N, C), (N, C, L), 2d, 3d
    n = draw(st.sampled_from([1, 2, 3, 8]))
    c = draw(st.sampled_from([1, 3, 5, 16]))
    spatial = tuple(draw(st.sampled_from([1, 2, 3, 7])) for _ in range(dims))
    shape = (n, c, *spatial)
    training = draw(st.booleans())
    count = n
    for s in spatial:
        count *= s
    if training and count == 1:
        training = False  # one value per channel raises; the bad-input tests hold that
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
    layout = draw(st.sampled_from(["contiguous", "channels_last", "transposed"] if dims == 2 else
                                  ["contiguous", "transposed"]))
    affine = draw(st.booleans())
    stats = draw(st.booleans()) or not training
    momentum = draw(st.sampled_from([0.1, 0.5, 1.0]))
    offset = draw(st.sampled_from([0.0, 5.0]))
    return dict(impl=impl, shape=shape, training=training, dtype=dtype, layout=layout, affine=affine, stats=stats,
                momentum=momentum, offset=offset)


@_profile(max_examples=40)
@given(case=_bn_cases())
@_seeded
def test_batch_norm_vs_torch_and_float64(case):
    impl, shape, dtype = case["impl"], case["shape"], case["dtype"]
    device, c = _device(impl), shape[1]
    x = (torch.randn(shape, device=device) * 2 + case["offset"]).to(dtype)
    if case["layout"] == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif case["layout"] == "transposed":
        x = _layout(x, "transposed")
    # torch's mixed dtypes: float32 affine parameters and statistics with a low-precision input.
    pdtype = torch.float32 if dtype in LOW else dtype
    w = torch.randn(c, device=device, dtype=pdtype) if case["affine"] else None
    b = torch.randn(c, device=device, dtype=pdtype) if case["affine"] else None
    rm = torch.randn(c, device=device, dtype=pdtype) if case["stats"] else None
    rv = torch.rand(c, device=device, dtype=pdtype) + 0.5 if case["stats"] else None
    dy = torch.randn(shape, device=device).to(dtype)
    training, momentum = case["training"], case["momentum"]
    stats = {}

    def fn(lib, key, cast):
        def run(x, w, b):
            rm_, rv_ = (cast(rm), cast(rv)) if rm is not None else (None, None)
            stats.setdefault(key, (rm_, rv_))  # the first run's: the oracle's nudged rerun keeps its own
            if lib is F:
                return F.batch_norm(x, rm_, rv_, w, b, training, momentum, 1e-5)
            return pyoptim.nn.functional.batch_norm(x, rm_, rv_, w, b, training, momentum, 1e-5, backend=impl[1])
        return run

    ours = _run(fn(pyoptim, "ours", lambda t: t.clone()), (x, w, b), dy)
    theirs = _run(fn(F, "theirs", lambda t: t.clone()), (x, w, b), dy)
    exact, noise = _oracle(fn(F, "exact", lambda t: t.double().cpu()), (x, w, b), dy)
    _assert_close_to_exact(("out", "grad_input", "grad_weight", "grad_bias"), ours, theirs, exact, dtype, impl,
                           noise)
    if rm is not None:
        _assert_close_to_exact(("running_mean", "running_var"), stats["ours"], stats["theirs"], stats["exact"],
                               pdtype, impl)


@_profile(max_examples=20)
@given(impl=st.sampled_from(_BN_IMPLS), training=st.booleans(),
       bad=st.sampled_from(["running_mean_size", "weight_size", "one_value", "eps_zero", "running_var_alone"]))
@_seeded
def test_batch_norm_bad_input_raises_torchs_error_and_writes_nothing(impl, training, bad):
    device = _device(impl)
    x = torch.randn((1, 3) if bad == "one_value" else (4, 3, 2), device=device)
    rm, rv = torch.full((3,), 0.5, device=device), torch.full((3,), 2.0, device=device)
    w, b, eps = torch.ones(3, device=device), torch.zeros(3, device=device), 1e-5
    if bad == "running_mean_size":
        rm = torch.full((4,), 0.5, device=device)
    elif bad == "weight_size":
        w = torch.ones(5, device=device)
    elif bad == "eps_zero":
        eps = 0.0
    elif bad == "running_var_alone":
        rm = None
    before = [t.clone() if t is not None else None for t in (rm, rv)]
    try:
        F.batch_norm(x, rm.clone() if rm is not None else None, rv.clone(), w, b, training, 0.1, eps)
        expected = None
    except Exception as e:  # noqa: BLE001 - the type is what is compared
        expected = type(e)
    if expected is None:
        return  # valid in this mode (e.g. one value per channel in eval)
    with pytest.raises(expected):
        pyoptim.nn.functional.batch_norm(x, rm, rv, w, b, training, 0.1, eps, backend=impl[1])
    for t, t0 in zip((rm, rv), before):
        if t is not None:
            assert torch.equal(t, t0), "a running statistic changed before the error"


# -- optimizers -------------------------------------------------------------------------

_SIZES = [0, 1, 2, 3, 7, 31, 127, 1000, 4099]


@st.composite
def _optim_cases(draw):
    name = draw(st.sampled_from(["Adam", "AdamW", "SGD"]))
    impl = draw(st.sampled_from(impls("sgd_step_" if name == "SGD" else "adam_step_")))
    shapes = draw(st.lists(st.sampled_from(_SIZES), min_size=1, max_size=5))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    transposed = draw(st.booleans())  # a non-contiguous param (a transposed 2-d leaf)
    lr = draw(st.sampled_from([1e-3, 0.1, 1.0]))
    wd = draw(st.sampled_from([0.0, 0.01, 0.5]))
    maximize = draw(st.booleans())
    if name == "SGD":
        momentum = draw(st.sampled_from([0.0, 0.9]))
        nesterov = momentum > 0 and draw(st.booleans())
        dampening = 0.0 if nesterov else draw(st.sampled_from([0.0, 0.3]))
        kw = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=wd,
                  maximize=maximize)
    else:
        betas = draw(st.sampled_from([(0.9, 0.999), (0.5, 0.9), (0.0, 0.99)]))
        eps = draw(st.sampled_from([1e-8, 1e-3]))
        amsgrad = draw(st.booleans())
        kw = dict(lr=lr, betas=betas, eps=eps, weight_decay=wd, amsgrad=amsgrad, maximize=maximize)
    return dict(name=name, impl=impl, shapes=shapes, dtype=dtype, transposed=transposed, kw=kw)


@_profile(max_examples=40)
@given(case=_optim_cases())
@_seeded
def test_optimizer_vs_torch_for_loop(case):
    """Three steps over two param groups equal torch's for-loop implementation, in fp32 and fp64."""
    impl, dtype = case["impl"], case["dtype"]
    device = _device(impl)
    init = []
    for i, s in enumerate(case["shapes"]):
        t = torch.randn(s, 2, device=device, dtype=dtype)
        init.append(t.t().contiguous().t() if case["transposed"] and i % 2 == 0 else t)
    ours_p = [p.clone().requires_grad_() for p in init]
    theirs_p = [p.clone().requires_grad_() for p in init]

    def groups(ps):
        half = len(ps) // 2
        return [g for g in ({"params": ps[:half]}, {"params": ps[half:], "lr": case["kw"]["lr"] / 2}) if g["params"]]

    ours = getattr(pyoptim.optim, case["name"])(groups(ours_p), backend=impl[1], **case["kw"])
    theirs = getattr(torch.optim, case["name"])(groups(theirs_p), foreach=False, **case["kw"])
    for _ in range(3):
        for a, b in zip(ours_p, theirs_p):
            g = torch.randn_like(a)
            a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    for a, b in zip(ours_p, theirs_p):
        assert a.stride() == b.stride()
        torch.testing.assert_close(a, b, **tol)
    for a, b in zip(ours_p, theirs_p):
        for key, value in theirs.state[b].items():
            torch.testing.assert_close(ours.state[a][key].to(value.device), value, **tol, msg=key)


@_profile(max_examples=20)
@given(impl=st.sampled_from(impls("adam_step_")), second=st.booleans(),
       bad=st.sampled_from(["duplicate_param", "state_shape", "state_dtype", "sparse_grad"]))
@_seeded
def test_optimizer_bad_input_writes_nothing(impl, second, bad):
    """A step that raises leaves every param and every state as they were (the bad tensor first or last)."""
    device = _device(impl)
    ps = [torch.randn(5, device=device, requires_grad=True), torch.randn(3, device=device, requires_grad=True)]
    if bad == "duplicate_param":
        with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
            pyoptim.optim.AdamW([{"params": ps[:1]}, {"params": ps[:1]}], backend=impl[1])
        return
    opt = pyoptim.optim.AdamW(ps, backend=impl[1])
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    for p in ps:
        p.grad = torch.randn_like(p)
    i = 1 if second else 0
    n = ps[i].numel()
    if bad == "state_shape":
        opt.state[ps[i]]["exp_avg_sq"] = torch.zeros(n + 1, device=device)
    elif bad == "state_dtype":
        opt.state[ps[i]]["exp_avg"] = torch.zeros(n, device=device, dtype=torch.float64)
    elif bad == "sparse_grad":
        ps[i].grad = torch.randn(n, device=device).to_sparse()
    params0 = [p.detach().clone() for p in ps]
    state0 = copy.deepcopy(opt.state_dict()["state"])
    try:
        opt.step()
    except RuntimeError:
        pass
    else:
        # torch.optim.AdamW refuses sparse grads; a mismatched state may be taken (as torch's for-loop takes a
        # float64 exp_avg by type promotion): the property held is "raises => writes nothing".
        assert bad != "sparse_grad", "a sparse grad was taken"
        return
    for p, p0 in zip(ps, params0):
        assert torch.equal(p, p0), "a param changed before the error"
    for k, s in opt.state_dict()["state"].items():
        for key, value in s.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(state0[k][key])), (k, key)
