"""Shared fixtures: the implementations to test, and the tolerance table.

On a machine without a GPU, Triton runs in its interpreter on CPU tensors
(TRITON_INTERPRET must be set before Triton is first imported).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pyoptim  # noqa: E402
from pyoptim import _backends  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

# Tolerances for a backend against torch's own fp32/fp64 path, after 10+
# steps: a few ulps of the stored dtype, grown by the steps' rounding.
TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-14),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
}


def impls(op: str) -> list[tuple[str, str]]:
    """(device type, backend) pairs that can run `op` here: every backend, not only the default."""
    out = []
    for device_type in ["cpu"] + (["cuda"] if HAS_CUDA else []):
        for backend in _backends.available(op, device_type):
            out.append((device_type, backend))
    return out


def impl_id(pair: tuple[str, str]) -> str:
    return f"{pair[0]}-{pair[1]}"


@pytest.fixture(params=impls("adam_step_"), ids=impl_id)
def adam_impl(request) -> tuple[str, str]:
    """(device type, backend) of one adam_step_ implementation."""
    return request.param


@pytest.fixture(params=impls("sgd_step_"), ids=impl_id)
def sgd_impl(request) -> tuple[str, str]:
    """(device type, backend) of one sgd_step_ implementation."""
    return request.param


@pytest.fixture(params=impls("lion_step_"), ids=impl_id)
def lion_impl(request) -> tuple[str, str]:
    """(device type, backend) of one lion_step_ implementation."""
    return request.param


@pytest.fixture(params=impls("lamb_step_"), ids=impl_id)
def lamb_impl(request) -> tuple[str, str]:
    """(device type, backend) of one lamb_step_ implementation."""
    return request.param


@pytest.fixture(params=impls("adagrad_step_"), ids=impl_id)
def adagrad_impl(request) -> tuple[str, str]:
    """(device type, backend) of one adagrad_step_ implementation."""
    return request.param


@pytest.fixture(params=impls("rmsprop_step_"), ids=impl_id)
def rmsprop_impl(request) -> tuple[str, str]:
    """(device type, backend) of one rmsprop_step_ implementation."""
    return request.param


@pytest.fixture(params=impls("multi_tensor_norm"), ids=impl_id)
def clip_impl(request) -> tuple[str, str]:
    """(device type, backend) of one multi_tensor_norm (and clip_scale_) implementation."""
    return request.param


def device_of(impl: tuple[str, str]) -> torch.device:
    return torch.device("cuda" if impl[0] == "cuda" else "cpu")


@pytest.fixture(params=impls("layer_norm_fwd"), ids=impl_id)
def norm_impl(request) -> tuple[str, str]:
    """(device type, backend) of one implementation of the norm ops (layer_norm_*, rms_norm_*)."""
    return request.param


@pytest.fixture(params=impls("batch_norm_fwd"), ids=impl_id)
def bn_impl(request) -> tuple[str, str]:
    """(device type, backend) of one implementation of the six batch_norm_* ops."""
    return request.param


def hand_over_state_dict(direction, ours_factory, torch_factory, init, steps_before=3, steps_after=3):
    """Train with one optimizer, load its state_dict into the other (pyoptim <-> torch) and step both on.

    Returns (params of the first, params of the second, first, second) after
    the common steps, for the caller to compare.
    """
    import copy

    a = [p.clone().requires_grad_() for p in init]
    b = [p.clone().requires_grad_() for p in init]
    if direction == "pyoptim_to_torch":
        first, second = ours_factory(a), torch_factory(b)
    else:
        first, second = torch_factory(a), ours_factory(b)
    grads = [[torch.randn_like(p) for p in init] for _ in range(steps_before + steps_after)]
    for gs in grads[:steps_before]:
        for p, g in zip(a, gs):
            p.grad = g.clone()
        first.step()
    with torch.no_grad():
        for p, q in zip(a, b):
            q.copy_(p)
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    for gs in grads[steps_before:]:
        for p, q, g in zip(a, b, gs):
            p.grad, q.grad = g.clone(), g.clone()
        first.step()
        second.step()
    return a, b, first, second


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def assert_compiled_autograd_equals_eager(step, leaves) -> None:
    """step() runs a forward and its .backward(); under torch.compile with compiled autograd the backward is
    captured and every leaf's grad equals eager's."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    step()
    eager = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    with torch._dynamo.config.patch(compiled_autograd=True):
        torch.compile(step, backend="aot_eager")()
    assert counters["compiled_autograd"]["captures"] >= 1
    for t, e in zip(leaves, eager):
        torch.testing.assert_close(t.grad, e, **TOL[torch.float32])


def assert_grads_of_some_leaves(ours, theirs, leaves, need, dy) -> None:
    """Grads of ours(x, weight, bias) and theirs(...) against dy, fresh leaves requiring grad only where named in
    `need` ("x", "weight", "bias"): each needed grad equal to theirs. `leaves` maps those names to tensors or None."""
    results = []
    for fn in (ours, theirs):
        fresh = {k: (t.detach().clone().requires_grad_(k in need) if t is not None else None)
                 for k, t in leaves.items()}
        y = fn(fresh["x"], fresh["weight"], fresh["bias"])
        results.append(torch.autograd.grad(y, [fresh[k] for k in need], dy))
    for name, a, e in zip(need, *results):
        torch.testing.assert_close(a, e, msg=lambda m: f"grad of {name}: {m}")


def torch_optim_db(name: str):
    """The OptimizerInfo of torch.optim.<name> in PyTorch's own optimizer test database (optim_db), or None when
    torch's test utilities cannot be imported here.

    They import expecttest (a test dependency torch does not install) only for the base class of their TestCase;
    where it is missing, a stand-in with unittest's TestCase serves.
    """
    import importlib.util
    import sys
    import types
    import unittest

    if "expecttest" not in sys.modules and importlib.util.find_spec("expecttest") is None:
        stub = types.ModuleType("expecttest")
        stub.TestCase = unittest.TestCase
        sys.modules["expecttest"] = stub
    try:
        from torch.testing._internal.common_optimizers import optim_db
    except Exception:  # torch's private test utilities moved or need more than this
        return None
    return next((info for info in optim_db if info.optim_cls.__name__ == name), None)


# -- helpers of the optimizer tests that step pyoptim beside torch --------------------


def step_both(a, b, oa, ob, steps=10, scale=1.0):
    """`steps` steps of `oa` over params `a` and `ob` over `b`, both fed the same fresh random grads (x scale)."""
    for _ in range(steps):
        for x, y in zip(a, b):
            g = torch.randn_like(x) * scale
            x.grad, y.grad = g.clone(), g.clone()
        oa.step()
        ob.step()


def snapshot(params, opt):
    """The params' values and the optimizer's state_dict, copied (for assert_unchanged)."""
    import copy

    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


def assert_unchanged(params, opt, snap) -> None:
    """Params and every state tensor bit for bit as `snap` (snapshot's) holds them, no state added or removed."""
    before_params, before_sd = snap
    for p, q in zip(params, before_params):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=0)
    sd = opt.state_dict()
    assert sd["state"].keys() == before_sd["state"].keys()
    for k, st in sd["state"].items():
        assert st.keys() == before_sd["state"][k].keys()
        for name, v in st.items():
            torch.testing.assert_close(v, before_sd["state"][k][name], rtol=0, atol=0)


def low_precision_errors(make_ours, make_torch, dtype, device, keys, steps=20, shapes=((1000,), (33, 17))):
    """{key: (ours, torch's)}: the relative L2 error, against torch's float64 run, of the params (key None) and of
    the state tensors `keys` after `steps` steps in `dtype` of ours (make_ours(params)) and of torch's for-loop
    (make_torch(params)), all fed the same grads. Asserts that ours keeps params and state in `dtype`."""
    master = [torch.randn(s, dtype=torch.float64, device=device) for s in shapes]
    ours = [m.to(dtype).requires_grad_() for m in master]
    theirs = [m.to(dtype).requires_grad_() for m in master]
    exact = [m.to(dtype).double().requires_grad_() for m in master]
    oo, ot, oe = make_ours(ours), make_torch(theirs), make_torch(exact)
    for _ in range(steps):
        for x, y, z in zip(ours, theirs, exact):
            g = torch.randn(x.shape, dtype=torch.float64, device=device).to(dtype)
            x.grad, y.grad, z.grad = g.clone(), g.clone(), g.double()
        oo.step()
        ot.step()
        oe.step()
    for x in ours:
        assert x.dtype == dtype and all(oo.state[x][k].dtype == dtype for k in keys)

    def rel_err(opt, ps, key):
        num = den = 0.0
        for x, z in zip(ps, exact):
            a = x.detach().double() if key is None else opt.state[x][key].double()
            b = z.detach() if key is None else oe.state[z][key]
            num += float((a - b).norm() ** 2)
            den += float(b.norm() ** 2)
        return (num / den) ** 0.5

    return {key: (rel_err(oo, ours, key), rel_err(ot, theirs, key)) for key in (None, *keys)}


def grad_scaler_against(make_ours, make_torch, device, steps=5, inf_step=2):
    """GradScaler over two copies of a Linear, one stepped by make_ours(params), one by make_torch(params); at
    `inf_step` an inf grad must change nothing (params and every state tensor). Returns (model, optimizer,
    scaler) of ours and of torch."""
    import copy

    torch.manual_seed(1)
    model_a = torch.nn.Linear(8, 4).to(device)
    model_b = copy.deepcopy(model_a)
    runs = [(model_a, make_ours(model_a.parameters()), torch.amp.GradScaler(device.type, init_scale=1024.0)),
            (model_b, make_torch(model_b.parameters()), torch.amp.GradScaler(device.type, init_scale=1024.0))]
    for it in range(steps):
        x = torch.randn(16, 8, device=device)
        for model, opt, scaler in runs:
            opt.zero_grad()
            scaler.scale(model(x).square().mean()).backward()
            if it == inf_step:
                model.weight.grad[0, 0] = float("inf")  # this step must change nothing, steps included
                snap = snapshot(list(model.parameters()), opt)
            scaler.step(opt)
            scaler.update()
            if it == inf_step:
                assert_unchanged(list(model.parameters()), opt, snap)
    return runs


def captured_steps_against(make_ours, make_torch, steps=6):
    """One step of make_ours(params) captured in a CUDA graph and replayed `steps - 1` times against
    make_torch(params)'s eager steps, over the same grads (CUDA only). Returns (params, optimizer) of both."""
    device = torch.device("cuda")
    init = [torch.randn(s, device=device) for s in [(1000,), (65537,), (3, 7)]]
    a = [p.clone().requires_grad_() for p in init]
    b = [p.clone().requires_grad_() for p in init]
    oa, ob = make_ours(a), make_torch(b)
    grads = [[torch.randn_like(p) for p in init] for _ in range(steps)]
    for p in a:
        p.grad = torch.zeros_like(p)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up: the state is made here
        for p, g in zip(a, grads[0]):
            p.grad.copy_(g)
        oa.step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        oa.step()
    for i, gs in enumerate(grads):
        if i > 0:
            for p, g in zip(a, gs):
                p.grad.copy_(g)
            graph.replay()
        for p, g in zip(b, gs):
            p.grad = g.clone()
        ob.step()
    torch.cuda.synchronize()
    return a, b, oa, ob


def torch_optim_db_inputs(name: str) -> list:
    """torch's own test configurations of torch.optim.<name> (optim_db's optim_inputs_func on CPU), as pytest
    params of their keywords (none where optim_db cannot be imported here)."""
    info = torch_optim_db(name)
    if info is None:
        return []
    return [pytest.param(oi.kwargs, id=oi.desc) for oi in info.optim_inputs_func(device="cpu")]


def assert_torch_optim_db_errors(name: str, ours_cls) -> None:
    """torch's own bad-input cases of torch.optim.<name> raise from `ours_cls` what they raise in torch (but the
    duplicate parameter, which torch only warns about and FusedOptimizer.add_param_group refuses)."""
    info = torch_optim_db(name)
    if info is None:
        pytest.skip("torch's optimizer test database cannot be imported here")
    from torch.testing._internal.common_optimizers import OptimizerErrorEnum

    for e in info.optim_error_inputs_func(device="cpu", dtype=torch.float32):
        if e.error_on != OptimizerErrorEnum.CONSTRUCTION_ERROR or e.error_type is UserWarning:
            continue
        inp = e.optimizer_error_input
        with pytest.raises(e.error_type, match=e.error_regex):
            ours_cls(inp.params, **inp.kwargs)


def assert_raises_as_torch(ours_cls, torch_cls, kwargs, message: str) -> None:
    """Both constructors, given `kwargs`, raise ValueError with exactly `message` (torch's own)."""
    pattern = "^" + message.replace("(", r"\(").replace(")", r"\)") + "$"
    for cls in (torch_cls, ours_cls):
        with pytest.raises(ValueError, match=pattern):
            cls([torch.zeros(2, requires_grad=True)], **kwargs)


def lr_scheduler_against(make_ours, make_torch, device, steps=6):
    """`steps` steps of each optimizer under StepLR(step_size=2, gamma=0.5) over one param; returns both
    params and optimizers."""
    init = torch.randn(6, device=device)
    a, b = [init.clone().requires_grad_()], [init.clone().requires_grad_()]
    oa, ob = make_ours(a), make_torch(b)
    sa = torch.optim.lr_scheduler.StepLR(oa, step_size=2, gamma=0.5)
    sb = torch.optim.lr_scheduler.StepLR(ob, step_size=2, gamma=0.5)
    for _ in range(steps):
        g = torch.randn(6, device=device)
        a[0].grad, b[0].grad = g.clone(), g.clone()
        oa.step()
        ob.step()
        sa.step()
        sb.step()
    assert oa.param_groups[0]["lr"] == ob.param_groups[0]["lr"]
    return a, b, oa, ob


def clipped_steps_against(make_ours, make_torch, device, max_norm, steps=10):
    """Ours (made with max_grad_norm=max_norm) against torch.nn.utils.clip_grad_norm_(max_norm) then torch's step,
    over grads large enough to be clipped; the pre-clip norms are compared every step. Returns both params and
    optimizers."""
    init = [torch.randn(s, device=device) for s in [(5,), (3, 4)]]
    a = [p.clone().requires_grad_() for p in init]
    b = [p.clone().requires_grad_() for p in init]
    oa, ob = make_ours(a), make_torch(b)
    for _ in range(steps):
        for x, y in zip(a, b):
            g = torch.randn_like(x) * 3
            x.grad, y.grad = g.clone(), g.clone()
        oa.step()
        norm = torch.nn.utils.clip_grad_norm_(b, max_norm)
        ob.step()
        torch.testing.assert_close(oa.grad_norm, norm, **TOL[torch.float32])
    return a, b, oa, ob


def same_keywords_against(ours_cls, torch_cls, kwargs, device, backend, steps=5):
    """ours_cls and torch_cls (foreach=False) built with the same keywords `kwargs` (Tensor values copied for
    each), stepped `steps` times over weights, a bias and a 0-d param; returns both params and optimizers."""
    init = [torch.randn(4, 3, device=device), torch.randn(3, device=device), torch.randn((), device=device)]
    a = [p.clone().requires_grad_() for p in init]
    b = [p.clone().requires_grad_() for p in init]

    def copied():
        return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}

    oa = ours_cls(a, backend=backend, **copied())
    ob = torch_cls(b, **dict(copied(), foreach=False))
    step_both(a, b, oa, ob, steps=steps)
    return a, b, oa, ob


def assert_signature_extends(ours_cls, torch_cls) -> None:
    """ours_cls's constructor takes torch_cls's parameters first, in order, with torch's defaults and kinds
    (positional or keyword-only), then only keyword-only ones of its own."""
    import inspect

    ours = inspect.signature(ours_cls).parameters
    theirs = inspect.signature(torch_cls).parameters
    assert list(ours)[:len(theirs)] == list(theirs)
    for name, p in theirs.items():
        assert ours[name].default == p.default and ours[name].kind == p.kind, name
    assert all(p.kind == inspect.Parameter.KEYWORD_ONLY for p in list(ours.values())[len(theirs):])
