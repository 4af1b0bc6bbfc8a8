"""RMSprop: every backend against torch.optim.RMSprop (foreach=False) and the edge cases."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

import pyoptim
from pyoptim import _backends
from tests.conftest import (TOL, assert_raises_as_torch, assert_signature_extends, assert_torch_optim_db_errors,
                            assert_unchanged, captured_steps_against, clipped_steps_against, device_of,
                            grad_scaler_against, hand_over_state_dict, low_precision_errors, lr_scheduler_against,
                            requires_cuda, same_keywords_against, snapshot, step_both, torch_optim_db_inputs)

SHAPES = [(), (1,), (15,), (17,), (4, 5)]  # 0-d, one element, a vector width +- 1, 2-D
OPTIONS = ("momentum", "centered", "weight_decay", "maximize")


def _groups(ps, momentum=0.0, **first):
    # Two groups of other hyperparameters with the same call-wide flags, so one call carries both; the second's
    # alpha puts grad_avg's lerp weight (1 - alpha = 0.7) on the other side of torch.lerp's 0.5.
    second = dict(lr=3e-2, alpha=0.3, eps=1e-6, weight_decay=0.05, momentum=0.5 if momentum > 0 else 0.0)
    return [dict(params=ps[:3], momentum=momentum, **first), dict(params=ps[3:], **second)]


def run_both(impl, dtype, steps=10, l1=0.0, shapes=SHAPES, momentum=0.0, **kw):
    """Step pyoptim's RMSprop and torch's (foreach=False) on copies of the same params, the first group with
    l1_weight_decay=l1 on ours; torch gets the grads that make its step ours: plus l1 * sign(p) (the gradient of
    l1 * sum(|p|)), minus it under maximize (torch negates what it is fed; ours adds the pull after maximize's
    sign, so L1 pulls towards 0 either way)."""
    device = device_of(impl)
    init = [torch.randn(s, dtype=dtype, device=device) for s in shapes]
    if init[2].numel() > 3:
        init[2].view(-1)[3] = 0.0  # sign(0) = 0: no pull on a zero
    a = [p.clone().requires_grad_() for p in init]
    b = [p.clone().requires_grad_() for p in init]
    oa = pyoptim.optim.RMSprop(_groups(a, momentum, l1_weight_decay=l1), backend=impl[1], **kw)
    ob = torch.optim.RMSprop(_groups(b, momentum), foreach=False, **kw)
    maximize = kw.get("maximize", False)
    for _ in range(steps):
        for i, (x, y) in enumerate(zip(a, b)):
            g = torch.randn_like(x)
            x.grad = g.clone()
            pull = l1 * torch.sign(y.detach()) if i < 3 else 0.0
            y.grad = g - pull if maximize else g + pull
        oa.step()
        ob.step()
    return a, b, oa, ob


# The momentum buffer sums terms g / avg of magnitude up to 1 / sqrt(1 - alpha) (10 for the default alpha), so
# the roundings in which we part from torch (its CPU sqrt, Sleef's, is not always correctly rounded; ours is, as
# the GPU's) are ulps of 10, about 1e-6 in fp32, and where the terms cancel they stay that size: an absolute
# bound of ten such ulps. Its lr-scaled effect on the params is within TOL.
BUF_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=2e-14)}


def assert_states(sa, sb, dtype):
    """Every state tensor of ours (sa) as torch's (sb): the same keys in torch's order, steps equal."""
    assert list(sa) == list(sb)
    for k in sb:
        if k == "step":
            assert float(sa[k]) == float(sb[k])
        else:
            torch.testing.assert_close(sa[k], sb[k], **(BUF_TOL if k == "momentum_buffer" else TOL)[dtype])


def assert_same(a, b, oa, ob, dtype):
    for x, y in zip(a, b):
        torch.testing.assert_close(x.detach(), y.detach(), **TOL[dtype])
        assert_states(oa.state[x], ob.state[y], dtype)


# -- against torch, every option ---------------------------------------------


@pytest.mark.parametrize(",".join(OPTIONS), list(itertools.product([0.0, 0.9], [False, True], [0.0, 0.1],
                                                                   [False, True])))
def test_matches_torch(rmsprop_impl, momentum, centered, weight_decay, maximize):
    a, b, oa, ob = run_both(rmsprop_impl, torch.float32, lr=1e-2, momentum=momentum, centered=centered,
                            weight_decay=weight_decay, maximize=maximize)
    assert_same(a, b, oa, ob, torch.float32)
    assert ("momentum_buffer" in oa.state[a[0]]) == (momentum > 0)
    assert ("grad_avg" in oa.state[a[0]]) == centered


@pytest.mark.parametrize("kw", [dict(), dict(momentum=0.9, centered=True, weight_decay=0.1, maximize=True,
                                              alpha=0.9, eps=1e-3)], ids=["defaults", "all"])
def test_matches_torch_float64(rmsprop_impl, kw):
    a, b, oa, ob = run_both(rmsprop_impl, torch.float64, **kw)
    assert_same(a, b, oa, ob, torch.float64)


@pytest.mark.parametrize("momentum,centered,weight_decay,maximize",
                         [(0.0, False, 0.0, False), (0.9, True, 0.1, False), (0.9, False, 0.1, True),
                          (0.0, True, 0.0, True)])
def test_l1_equals_torch_on_the_l1_regularized_loss(rmsprop_impl, momentum, centered, weight_decay, maximize):
    a, b, oa, ob = run_both(rmsprop_impl, torch.float32, l1=0.05, momentum=momentum, centered=centered,
                            weight_decay=weight_decay, maximize=maximize)
    assert_same(a, b, oa, ob, torch.float32)
    assert oa.param_groups[0]["l1_weight_decay"] == 0.05 and oa.param_groups[1]["l1_weight_decay"] == 0.0


def test_groups_with_other_flags_make_calls_of_their_own(rmsprop_impl):
    # centered and momentum > 0 are call-wide: a plain group, a centered one with momentum, a momentum-only one
    # and an fp64 one make four calls in one step, each against torch.
    device = device_of(rmsprop_impl)
    init = [torch.randn(5, device=device), torch.randn(3, 4, device=device), torch.randn(7, device=device),
            torch.randn(6, dtype=torch.float64, device=device)]

    def groups(ps):
        return [dict(params=[ps[0]]), dict(params=[ps[1]], centered=True, momentum=0.9),
                dict(params=[ps[2]], momentum=0.5, alpha=0.5), dict(params=[ps[3]], centered=True)]

    a = [p.clone().requires_grad_() for p in init]
    b = [p.clone().requires_grad_() for p in init]
    oa = pyoptim.optim.RMSprop(groups(a), lr=1e-2, backend=rmsprop_impl[1])
    ob = torch.optim.RMSprop(groups(b), lr=1e-2, foreach=False)
    step_both(a, b, oa, ob)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **TOL[x.dtype])
        assert_states(oa.state[x], ob.state[y], x.dtype)


@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.float64], ids=str)
def test_tensor_lr_and_boundary_shapes(rmsprop_impl, lr_dtype):
    # An empty tensor (its step still advances), a Triton block plus one (1025), and a CPU chunk plus one (16385).
    shapes = [(0,), (3,), (1025,)] + ([(16385,)] if rmsprop_impl[1] != "triton" else [])
    device = device_of(rmsprop_impl)
    init = [torch.randn(s, device=device) for s in shapes]
    a = [p.clone().requires_grad_() for p in init]
    b = [p.clone().requires_grad_() for p in init]
    kw = dict(momentum=0.9, centered=True, weight_decay=0.1)
    oa = pyoptim.optim.RMSprop(a, lr=torch.tensor(3e-3, dtype=lr_dtype), backend=rmsprop_impl[1], **kw)
    ob = torch.optim.RMSprop(b, lr=torch.tensor(3e-3, dtype=lr_dtype), foreach=False, **kw)
    step_both(a, b, oa, ob)
    assert_same(a, b, oa, ob, torch.float32)


def test_signature_mirrors_torch():
    # torch's parameters, defaults and kinds (all positional-or-keyword), then ours, keyword-only.
    assert_signature_extends(pyoptim.optim.RMSprop, torch.optim.RMSprop)


def test_state_keys_and_types_match_torch():
    a = [torch.randn(3, requires_grad=True)]
    b = [a[0].detach().clone().requires_grad_()]
    kw = dict(momentum=0.9, centered=True)
    oa, ob = pyoptim.optim.RMSprop(a, **kw), torch.optim.RMSprop(b, **kw)
    assert len(oa.state) == len(ob.state) == 0  # made at the first step, as torch does
    a[0].grad, b[0].grad = torch.ones(3), torch.ones(3)
    oa.step()
    ob.step()
    sa, sb = oa.state_dict(), ob.state_dict()
    assert list(sa["state"][0]) == list(sb["state"][0]) == ["step", "square_avg", "momentum_buffer", "grad_avg"]
    for k, v in sb["state"][0].items():
        assert sa["state"][0][k].dtype == v.dtype and sa["state"][0][k].shape == v.shape
    assert set(sb["param_groups"][0]) <= set(sa["param_groups"][0])


def test_complex_params_match_torch():
    p = torch.randn(6, dtype=torch.complex64)
    a, b = [p.clone().requires_grad_()], [p.clone().requires_grad_()]
    kw = dict(lr=1e-2, weight_decay=0.1, momentum=0.9, centered=True)
    oa, ob = pyoptim.optim.RMSprop(a, **kw), torch.optim.RMSprop(b, foreach=False, **kw)
    step_both(a, b, oa, ob, steps=5)
    torch.testing.assert_close(a[0], b[0], **TOL[torch.float32])
    assert_states(oa.state[a[0]], ob.state[b[0]], torch.float32)


def test_step_plan_records_and_replays():
    # note [step plan]: the second step records the plan (the first made the state), the later ones replay it.
    if "cpu" not in _backends.available("rmsprop_step_", "cpu"):
        pytest.skip("the extension is not built")
    a, b, oa, ob = run_both(("cpu", "cpu"), torch.float32, steps=4, momentum=0.9, centered=True)
    assert oa.__dict__.get("_plan") is not None
    assert_same(a, b, oa, ob, torch.float32)


def test_flat_storage_equals_the_ordinary_path(rmsprop_impl):
    device = device_of(rmsprop_impl)
    init = [torch.randn(s, device=device) for s in [(5,), (3, 4), (7,)]]
    a = [p.clone().requires_grad_() for p in init]
    b = [p.clone().requires_grad_() for p in init]
    kw = dict(lr=1e-2, momentum=0.9, centered=True, weight_decay=0.1, backend=rmsprop_impl[1])
    oa, ob = pyoptim.optim.RMSprop(a, flat=True, **kw), pyoptim.optim.RMSprop(b, **kw)
    step_both(a, b, oa, ob, steps=5)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
        for k in ("square_avg", "grad_avg", "momentum_buffer"):
            torch.testing.assert_close(oa.state[x][k], ob.state[y][k], rtol=0, atol=0)
        assert float(oa.state[x]["step"]) == float(ob.state[y]["step"]) == 5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("momentum,centered", [(0.0, False), (0.9, True)])
def test_low_precision_at_least_as_accurate_as_torch(rmsprop_impl, dtype, momentum, centered):
    """Error against a float64 run, for params and every state: ours (fp32 math, one rounding per stored value) is
    no worse than torch's for-loop (which rounds after every op), in the params' dtype. A param's error is
    mostly its own rounding to that dtype, once a step in both: there ours may sit a hair either side of
    torch's. eps=1e-6: torch's fp16 for-loop rounds the default 1e-8 to 0 and then divides by a square_avg
    that underflowed (NaN params; ours keeps eps in fp32 and stays finite)."""
    kw = dict(lr=1e-2, momentum=momentum, centered=centered, weight_decay=0.1, eps=1e-6)
    keys = ["square_avg"] + (["momentum_buffer"] if momentum else []) + (["grad_avg"] if centered else [])
    errors = low_precision_errors(lambda ps: pyoptim.optim.RMSprop(ps, backend=rmsprop_impl[1], **kw),
                                  lambda ps: torch.optim.RMSprop(ps, foreach=False, **kw), dtype,
                                  device_of(rmsprop_impl), keys)
    for key, (e_ours, e_torch) in errors.items():
        assert e_ours <= e_torch * (1.01 if key is None else 1.0), (key or "param", e_ours, e_torch)


# -- the API: GradScaler, the clip, state_dict, schedulers ---------------------


def test_grad_scaler_skips_inf_step(rmsprop_impl):
    kw = dict(lr=1e-2, momentum=0.9, centered=True)
    (model_a, opt_a, scaler_a), (model_b, opt_b, scaler_b) = grad_scaler_against(
        lambda ps: pyoptim.optim.RMSprop(ps, backend=rmsprop_impl[1], **kw),
        lambda ps: torch.optim.RMSprop(ps, foreach=False, **kw), device_of(rmsprop_impl))
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(p, q, **TOL[torch.float32])
        assert_states(opt_a.state[p], opt_b.state[q], torch.float32)
        assert float(opt_a.state[p]["step"]) == 4
    assert scaler_a.get_scale() == scaler_b.get_scale()


def test_fused_clip_equals_clip_then_step(rmsprop_impl):
    kw = dict(lr=1e-2, momentum=0.9)
    a, b, oa, ob = clipped_steps_against(
        lambda ps: pyoptim.optim.RMSprop(ps, max_grad_norm=0.5, backend=rmsprop_impl[1], **kw),
        lambda ps: torch.optim.RMSprop(ps, foreach=False, **kw), device_of(rmsprop_impl), 0.5)
    assert_same(a, b, oa, ob, torch.float32)


@pytest.mark.parametrize("direction", ["pyoptim_to_torch", "torch_to_pyoptim"])
def test_state_dict_round_trip(rmsprop_impl, direction):
    device = device_of(rmsprop_impl)
    init = [torch.randn(5, device=device), torch.randn(3, 4, device=device)]
    kw = dict(lr=1e-2, momentum=0.9, centered=True, weight_decay=0.05)
    a, b, first, second = hand_over_state_dict(
        direction, lambda ps: pyoptim.optim.RMSprop(ps, backend=rmsprop_impl[1], **kw),
        lambda ps: torch.optim.RMSprop(ps, foreach=False, **kw), init)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, **TOL[torch.float32])
        assert_states(first.state[p], second.state[q], torch.float32)
        assert float(first.state[p]["step"]) == 6
    ours = first if direction == "pyoptim_to_torch" else second
    assert all(g["l1_weight_decay"] == 0.0 and g["maximize"] is False for g in ours.param_groups)


def test_lr_scheduler(rmsprop_impl):
    kw = dict(lr=0.1, momentum=0.5)
    a, b, oa, ob = lr_scheduler_against(lambda ps: pyoptim.optim.RMSprop(ps, backend=rmsprop_impl[1], **kw),
                                        lambda ps: torch.optim.RMSprop(ps, foreach=False, **kw),
                                        device_of(rmsprop_impl))
    assert oa.param_groups[0]["lr"] == 0.1 * 0.5**3
    torch.testing.assert_close(a[0], b[0], **TOL[torch.float32])


# -- PyTorch's own optimizer inputs (optim_db) ---------------------------------------


@pytest.mark.parametrize("kwargs", torch_optim_db_inputs("RMSprop"))
def test_torch_optim_db_inputs(rmsprop_impl, kwargs):
    # Each of torch's own test configurations of RMSprop, ours built with the same keywords, against torch's for-loop.
    a, b, oa, ob = same_keywords_against(pyoptim.optim.RMSprop, torch.optim.RMSprop, kwargs, device_of(rmsprop_impl),
                                         rmsprop_impl[1])
    assert_same(a, b, oa, ob, torch.float32)


def test_torch_optim_db_error_inputs():
    # torch's own bad-input cases raise here what they raise in torch.
    assert_torch_optim_db_errors("RMSprop", pyoptim.optim.RMSprop)


# -- bad input, and exception safety -------------------------------------------


@pytest.mark.parametrize("kwargs,message", [
    (dict(lr=-1.0), "Invalid learning rate: -1.0"),
    (dict(eps=-1.0), "Invalid epsilon value: -1.0"),
    (dict(momentum=-0.5), "Invalid momentum value: -0.5"),
    (dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
    (dict(alpha=-0.1), "Invalid alpha value: -0.1"),
    (dict(lr=torch.tensor([1e-2, 1e-2])), "Tensor lr must be 1-element"),
])
def test_bad_hyperparameters_raise_torchs_errors(kwargs, message):
    assert_raises_as_torch(pyoptim.optim.RMSprop, torch.optim.RMSprop, kwargs, message)


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(l1_weight_decay=-0.1), ValueError, "^Invalid l1_weight_decay value: -0.1$"),
    (dict(max_grad_norm=0.0), ValueError, "^Invalid max_grad_norm value: 0.0$"),
    (dict(differentiable=True), RuntimeError, r"does not support differentiable=True \(use torch.optim.RMSprop\)"),
    (dict(backend="opencl"), ValueError, "unknown backend"),
])
def test_bad_extra_arguments_raise(kwargs, error, message):
    with pytest.raises(error, match=message):
        pyoptim.optim.RMSprop([torch.zeros(2, requires_grad=True)], **kwargs)


def test_foreach_and_capturable_are_accepted():
    for kw in (dict(foreach=True), dict(foreach=False), dict(capturable=True)):
        p = torch.randn(3, requires_grad=True)
        opt = pyoptim.optim.RMSprop([p], **kw)
        p.grad = torch.ones(3)
        opt.step()
        assert float(opt.state[p]["step"]) == 1


def test_sparse_grad_raises(rmsprop_impl):
    device = device_of(rmsprop_impl)
    p = torch.randn(4, device=device, requires_grad=True)
    opt = pyoptim.optim.RMSprop([p], backend=rmsprop_impl[1])
    p.grad = torch.sparse_coo_tensor([[0]], [1.0], (4,), device=device)
    with pytest.raises(RuntimeError, match="^RMSprop does not support sparse gradients$"):
        opt.step()
    assert p not in opt.state


@pytest.mark.parametrize("corrupt", ["state_shape", "group_alpha", "group_l1"])
def test_failed_step_changes_nothing(rmsprop_impl, corrupt):
    # Two calls (fp32 and fp64 groups); a bad argument of the second must stop the first from writing.
    device = device_of(rmsprop_impl)
    p32 = [torch.randn(4, device=device, requires_grad=True), torch.randn(5, device=device, requires_grad=True)]
    p64 = [torch.randn(3, dtype=torch.float64, device=device, requires_grad=True)]
    opt = pyoptim.optim.RMSprop([{"params": p32}, {"params": p64}], momentum=0.9, centered=True,
                                backend=rmsprop_impl[1])
    for p in p32 + p64:
        p.grad = torch.randn_like(p)
    opt.step()
    if corrupt == "state_shape":
        opt.state[p32[1]]["grad_avg"] = torch.zeros(6, device=device)
        match = r"grad_avgs\[1\] has shape"
    elif corrupt == "group_alpha":
        opt.param_groups[1]["alpha"] = -1.0  # set behind the constructor's checks
        match = "Invalid alpha value: -1"
    else:
        opt.param_groups[1]["l1_weight_decay"] = -1.0
        match = "Invalid l1_weight_decay value: -1"
    snap = snapshot(p32 + p64, opt)
    with pytest.raises(RuntimeError, match=match):
        opt.step()
    assert_unchanged(p32 + p64, opt, snap)


def test_op_errors():
    t = lambda: [torch.zeros(3), torch.zeros(3)]  # noqa: E731
    steps = [torch.zeros(()), torch.zeros(())]
    kw = dict(lr=[1e-2], alpha=[0.99], eps=[1e-8], weight_decay=[0.0], momentum=[0.0])
    for backend in _backends.available("rmsprop_step_", "cpu"):
        with pytest.raises(RuntimeError, match=r"rmsprop_step_: square_avgs\[1\] has dtype"):
            pyoptim.functional.rmsprop_step_(t(), t(), [torch.zeros(3), torch.zeros(3, dtype=torch.float64)], [],
                                             [], steps, **kw, backend=backend)
        with pytest.raises(RuntimeError, match="rmsprop_step_: centered needs one grad_avgs entry per param"):
            pyoptim.functional.rmsprop_step_(t(), t(), t(), [], [], steps, **kw, centered=True, backend=backend)
        with pytest.raises(RuntimeError, match="rmsprop_step_: group 0 has momentum 0.9 but no momentum_buffers"):
            pyoptim.functional.rmsprop_step_(t(), t(), t(), [], [], steps, **dict(kw, momentum=[0.9]),
                                             backend=backend)


def test_empty_list_is_a_no_op():
    pyoptim.functional.rmsprop_step_([], [], [], [], [], [], lr=[1e-2], alpha=[0.99], eps=[1e-8], weight_decay=[0.0],
                                     momentum=[0.0])
    opt = pyoptim.optim.RMSprop([torch.zeros(2, requires_grad=True)])
    opt.step()  # no grads at all
    assert len(opt.state) == 0


def test_found_inf_skips_everything(rmsprop_impl):
    device = device_of(rmsprop_impl)
    args, kwargs = _op_args()
    args = tuple([t.to(device) for t in lst] for lst in args)
    before = copy.deepcopy(args)
    kwargs["found_inf"] = torch.tensor(1.0, device=device)
    pyoptim.functional.rmsprop_step_(*args, **kwargs, backend=rmsprop_impl[1])
    for xs, ys in zip(args, before):
        for x, y in zip(xs, ys):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


# -- the op: opcheck, every backend against the reference, torch.compile ------------


def _op_args(dtype=torch.float32, centered=True, momentum=True):
    shapes = [(5,), (2, 3), ()]
    t = lambda: [torch.randn(s, dtype=dtype) for s in shapes]  # noqa: E731
    square_avgs = [x.abs() + 1 for x in t()]  # above grad_avg^2: a centered avg of real numbers
    return (t(), t(), square_avgs, t() if centered else [], t() if momentum else [],
            [torch.tensor(2.0) for _ in shapes]), dict(
        lr=[1e-2, 2e-2], alpha=[0.99, 0.3], eps=[1e-8, 1e-6], weight_decay=[0.0, 0.1],
        momentum=[0.9, 0.5] if momentum else [0.0, 0.0], l1_weight_decay=[0.01, 0.0], group_sizes=[2, 1],
        centered=centered, maximize=False)


@pytest.mark.parametrize("centered,momentum", [(False, False), (True, True)])
def test_every_backend_agrees_with_reference(rmsprop_impl, centered, momentum):
    # The op's contract (per-group lists, grad_scale, the clip, lr_tensor) through each backend against
    # reference.rmsprop_step_ref directly.
    device = device_of(rmsprop_impl)
    args, kwargs = _op_args(centered=centered, momentum=momentum)
    args = tuple([t.to(device) for t in lst] for lst in args)
    kwargs.update(grad_scale=torch.tensor(8.0, device=device), grad_norm=torch.tensor(40.0, device=device),
                  max_grad_norm=1.0, lr_tensor=torch.tensor([3e-2, 1e-2], dtype=torch.float64, device=device))
    ref = copy.deepcopy(args)
    pyoptim.functional.rmsprop_step_(*args, **kwargs, backend=rmsprop_impl[1])
    pyoptim.reference.rmsprop_step_ref(*ref, **kwargs)
    for xs, ys in zip(args, ref):
        for x, y in zip(xs, ys):
            torch.testing.assert_close(x, y, **TOL[torch.float32])


@pytest.mark.skipif(not _backends.EXTENSION_LOADED, reason="the extension is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(dtype):
    args, kwargs = _op_args(dtype)
    torch.library.opcheck(torch.ops.pyoptim.rmsprop_step_, args, kwargs)
    args, kwargs = _op_args(dtype, centered=False, momentum=False)
    kwargs.update(grad_scale=torch.tensor(4.0), found_inf=torch.tensor(0.0), grad_norm=torch.tensor(3.0),
                  max_grad_norm=1.0, lr_tensor=torch.tensor([1e-3, 1e-2], dtype=torch.float64))
    torch.library.opcheck(torch.ops.pyoptim.rmsprop_step_, args, kwargs)


@pytest.mark.skipif(not _backends.EXTENSION_LOADED, reason="the extension is not built")
def test_torch_compile_fullgraph():
    args, kwargs = _op_args()
    expected = copy.deepcopy(args)

    def step(p, g, sa, ga, buf, s):
        torch.ops.pyoptim.rmsprop_step_(p, g, sa, ga, buf, s, **kwargs)

    torch.compile(step, fullgraph=True, backend="aot_eager")(*args)
    step(*expected)
    for xs, ys in zip(args, expected):
        for x, y in zip(xs, ys):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


# -- CUDA only -------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_capture(backend):
    # capturable: a Tensor lr read on the device, one captured step replayed against torch's eager steps.
    if backend not in _backends.available("rmsprop_step_", "cuda"):
        pytest.skip(f"{backend} is not built here")
    kw = dict(momentum=0.9, centered=True, weight_decay=0.1)
    a, b, oa, ob = captured_steps_against(
        lambda ps: pyoptim.optim.RMSprop(ps, lr=torch.tensor(1e-3, device="cuda"), capturable=True, backend=backend,
                                         **kw),
        lambda ps: torch.optim.RMSprop(ps, lr=1e-3, foreach=False, **kw))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **TOL[torch.float32])
        assert float(oa.state[x]["step"]) == float(ob.state[y]["step"]) == 6
