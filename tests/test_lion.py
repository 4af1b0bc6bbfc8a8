"""Lion: every backend against the lion-pytorch package (the paper's algorithm) and the edge cases."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

import pyoptim
from pyoptim import _backends
from tests.conftest import TOL, device_of, hand_over_state_dict, requires_cuda

lion_pytorch = pytest.importorskip("lion_pytorch", reason="the oracle, lion-pytorch, is not installed "
                                   "(the Makefile installs it)")
Oracle = lion_pytorch.Lion

SHAPES = [(), (1,), (15,), (17,), (4, 5)]  # 0-d, one element, a vector width +- 1, 2-D


def _groups(ps, **kw):
    # Two groups of other hyperparameters, so one call carries both.
    return [dict(params=ps[:3], **kw), dict(params=ps[3:], lr=2e-2, betas=(0.8, 0.9))]


def run_both(impl, dtype, steps=10, l1=0.0, maximize=False, weight_decay=0.0, shapes=SHAPES, **kw):
    """Step pyoptim's Lion and lion-pytorch's on copies of the same params; the oracle gets the grads that make
    its step ours: negated for maximize, and plus l1 * sign(p) (the gradient of l1 * sum(|p|)), sign applied after
    maximize's so that L1 always pulls towards 0."""
    device = device_of(impl)
    init = [torch.randn(s, dtype=dtype, device=device) for s in shapes]
    a = [p.clone().requires_grad_() for p in init]
    b = [p.clone().requires_grad_() for p in init]
    oa = pyoptim.optim.Lion(_groups(a, weight_decay=weight_decay), lr=1e-2, maximize=maximize, l1_weight_decay=l1,
                            backend=impl[1], **kw)
    ob = Oracle(_groups(b, weight_decay=weight_decay), lr=1e-2)
    for _ in range(steps):
        for x, y in zip(a, b):
            g = torch.randn_like(x)
            x.grad = g.clone()
            y.grad = (-g if maximize else g) + l1 * torch.sign(y.detach())
        oa.step()
        ob.step()
    return a, b, oa, ob


def assert_same(a, b, oa, ob, dtype):
    for x, y in zip(a, b):
        torch.testing.assert_close(x.detach(), y.detach(), **TOL[dtype])
        assert set(oa.state[x]) == set(ob.state[y]) == {"exp_avg"}
        torch.testing.assert_close(oa.state[x]["exp_avg"], ob.state[y]["exp_avg"], **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("weight_decay,l1,maximize", list(itertools.product([0.0, 0.1], [0.0, 0.05], [False, True])))
def test_matches_lion_pytorch(lion_impl, dtype, weight_decay, l1, maximize):
    a, b, oa, ob = run_both(lion_impl, dtype, l1=l1, maximize=maximize, weight_decay=weight_decay)
    assert_same(a, b, oa, ob, dtype)


def test_tensor_lr_and_boundary_shapes(lion_impl):
    # An empty tensor, a CPU chunk plus one (16385) and a Triton block plus one (1025).
    shapes = [(0,), (3,), (1025,)] + ([(16385,)] if lion_impl[1] != "triton" else [])
    device = device_of(lion_impl)
    init = [torch.randn(s, device=device) for s in shapes]
    a = [p.clone().requires_grad_() for p in init]
    b = [p.clone().requires_grad_() for p in init]
    oa = pyoptim.optim.Lion(a, lr=torch.tensor(3e-3), weight_decay=0.1, backend=lion_impl[1])
    ob = Oracle(b, lr=3e-3, weight_decay=0.1)
    for _ in range(10):
        for x, y in zip(a, b):
            g = torch.randn_like(x)
            x.grad, y.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    assert_same(a, b, oa, ob, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_matches_reference(lion_impl, dtype):
    # fp16/bf16 storage, fp32 math, one rounding per stored value: the reference op, stepped on the same values.
    device = device_of(lion_impl)
    params = [torch.randn(s, device=device).to(dtype) for s in [(33,), (4, 5)]]
    ours = [p.clone().requires_grad_() for p in params]
    opt = pyoptim.optim.Lion(ours, lr=1e-2, weight_decay=0.1, l1_weight_decay=0.01, backend=lion_impl[1])
    ref_p = [p.clone() for p in params]
    ref_m = [torch.zeros_like(p) for p in params]
    for _ in range(10):
        gs = [torch.randn_like(p) for p in params]
        for x, g in zip(ours, gs):
            x.grad = g.clone()
        opt.step()
        pyoptim.reference.lion_step_ref(ref_p, gs, ref_m, lr=[1e-2], beta1=[0.9], beta2=[0.99], weight_decay=[0.1],
                                        l1_weight_decay=[0.01], group_sizes=[2], maximize=False)
    for x, p, m in zip(ours, ref_p, ref_m):
        assert x.dtype == dtype and opt.state[x]["exp_avg"].dtype == dtype
        torch.testing.assert_close(x.detach(), p, rtol=0, atol=0)
        torch.testing.assert_close(opt.state[x]["exp_avg"], m, rtol=0, atol=0)


def test_grad_scaler_skips_inf_step(lion_impl):
    device = device_of(lion_impl)
    torch.manual_seed(1)
    model_a = torch.nn.Linear(8, 4).to(device)
    model_b = copy.deepcopy(model_a)
    opt_a = pyoptim.optim.Lion(model_a.parameters(), lr=1e-2, backend=lion_impl[1])
    opt_b = Oracle(model_b.parameters(), lr=1e-2)
    scaler_a = torch.amp.GradScaler(device.type, init_scale=1024.0)
    scaler_b = torch.amp.GradScaler(device.type, init_scale=1024.0)
    for it in range(5):
        x = torch.randn(16, 8, device=device)
        for model, opt, scaler in ((model_a, opt_a, scaler_a), (model_b, opt_b, scaler_b)):
            opt.zero_grad()
            scaler.scale(model(x).square().mean()).backward()
            if it == 2:
                model.weight.grad[0, 0] = float("inf")  # this step must change nothing
                before = [p.detach().clone() for p in model.parameters()]
            scaler.step(opt)
            scaler.update()
            if it == 2:
                for p, q in zip(model.parameters(), before):
                    torch.testing.assert_close(p.detach(), q, rtol=0, atol=0)
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(p, q, **TOL[torch.float32])
        torch.testing.assert_close(opt_a.state[p]["exp_avg"], opt_b.state[q]["exp_avg"], **TOL[torch.float32])
    assert scaler_a.get_scale() == scaler_b.get_scale()


def test_fused_clip_equals_clip_then_step(lion_impl):
    device = device_of(lion_impl)
    init = [torch.randn(s, device=device) for s in [(5,), (3, 4)]]
    a = [p.clone().requires_grad_() for p in init]
    b = [p.clone().requires_grad_() for p in init]
    oa = pyoptim.optim.Lion(a, lr=1e-2, max_grad_norm=0.5, backend=lion_impl[1])
    ob = Oracle(b, lr=1e-2)
    for _ in range(10):
        for x, y in zip(a, b):
            g = torch.randn_like(x) * 3
            x.grad, y.grad = g.clone(), g.clone()
        oa.step()
        norm = torch.nn.utils.clip_grad_norm_(b, 0.5)
        ob.step()
        torch.testing.assert_close(oa.grad_norm, norm, **TOL[torch.float32])
    assert_same(a, b, oa, ob, torch.float32)


@pytest.mark.parametrize("direction", ["pyoptim_to_torch", "torch_to_pyoptim"])
def test_state_dict_round_trip(lion_impl, direction):
    device = device_of(lion_impl)
    init = [torch.randn(5, device=device), torch.randn(3, 4, device=device)]
    a, b, first, second = hand_over_state_dict(
        direction, lambda ps: pyoptim.optim.Lion(ps, lr=1e-2, weight_decay=0.1, backend=lion_impl[1]),
        lambda ps: Oracle(ps, lr=1e-2, weight_decay=0.1), init)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, **TOL[torch.float32])
        torch.testing.assert_close(first.state[p]["exp_avg"], second.state[q]["exp_avg"], **TOL[torch.float32])
    ours = first if direction == "pyoptim_to_torch" else second
    assert all(g["l1_weight_decay"] == 0.0 and g["maximize"] is False for g in ours.param_groups)


def test_lr_scheduler(lion_impl):
    device = device_of(lion_impl)
    init = torch.randn(6, device=device)
    a, b = [init.clone().requires_grad_()], [init.clone().requires_grad_()]
    oa, ob = pyoptim.optim.Lion(a, lr=0.1, backend=lion_impl[1]), Oracle(b, lr=0.1)
    sa = torch.optim.lr_scheduler.StepLR(oa, step_size=2, gamma=0.5)
    sb = torch.optim.lr_scheduler.StepLR(ob, step_size=2, gamma=0.5)
    for _ in range(6):
        g = torch.randn(6, device=device)
        a[0].grad, b[0].grad = g.clone(), g.clone()
        oa.step()
        ob.step()
        sa.step()
        sb.step()
    assert oa.param_groups[0]["lr"] == ob.param_groups[0]["lr"] == 0.1 * 0.5**3
    torch.testing.assert_close(a[0], b[0], **TOL[torch.float32])


@pytest.mark.parametrize("kwargs,message", [
    (dict(lr=-1.0), "Invalid learning rate: -1.0"),
    (dict(betas=(1.0, 0.99)), "Invalid beta parameter at index 0: 1.0"),
    (dict(betas=(0.9, -0.1)), "Invalid beta parameter at index 1: -0.1"),
    (dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
    (dict(l1_weight_decay=-0.1), "Invalid l1_weight_decay value: -0.1"),
    (dict(max_grad_norm=0.0), "Invalid max_grad_norm value: 0.0"),
])
def test_bad_hyperparameters_raise(kwargs, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)") + "$"):
        pyoptim.optim.Lion([torch.zeros(2, requires_grad=True)], **kwargs)


def test_differentiable_raises():
    with pytest.raises(RuntimeError, match="does not support differentiable=True"):
        pyoptim.optim.Lion([torch.zeros(2, requires_grad=True)], differentiable=True)


@pytest.mark.parametrize("corrupt", ["state_shape", "group_l1"])
def test_failed_step_changes_nothing(lion_impl, corrupt):
    device = device_of(lion_impl)
    p32 = [torch.randn(4, device=device, requires_grad=True), torch.randn(5, device=device, requires_grad=True)]
    p64 = [torch.randn(3, dtype=torch.float64, device=device, requires_grad=True)]
    opt = pyoptim.optim.Lion([{"params": p32}, {"params": p64}], backend=lion_impl[1])
    for p in p32 + p64:
        p.grad = torch.randn_like(p)
    opt.step()
    if corrupt == "state_shape":
        opt.state[p32[1]]["exp_avg"] = torch.zeros(6, device=device)
        match = r"exp_avgs\[1\] has shape"
    else:
        opt.param_groups[1]["l1_weight_decay"] = -1.0  # set behind the constructor's checks: the second call's
        match = "Invalid l1_weight_decay value: -1"
    before = [p.detach().clone() for p in p32 + p64]
    state = copy.deepcopy(opt.state_dict()["state"])
    with pytest.raises(RuntimeError, match=match):
        opt.step()
    for p, q in zip(p32 + p64, before):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=0)
    for k, st in opt.state_dict()["state"].items():
        if st["exp_avg"].shape == state[k]["exp_avg"].shape:
            torch.testing.assert_close(st["exp_avg"], state[k]["exp_avg"], rtol=0, atol=0)


def test_found_inf_skips_everything(lion_impl):
    device = device_of(lion_impl)
    lists = [[torch.randn(5, device=device), torch.randn(3, device=device)] for _ in range(3)]
    before = copy.deepcopy(lists)
    pyoptim.functional.lion_step_(*lists, lr=[1e-2], beta1=[0.9], beta2=[0.99], weight_decay=[0.1],
                                  found_inf=torch.tensor(1.0, device=device), backend=lion_impl[1])
    for xs, ys in zip(lists, before):
        for x, y in zip(xs, ys):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def _op_args(dtype=torch.float32):
    shapes = [(5,), (2, 3), ()]
    t = lambda: [torch.randn(s, dtype=dtype) for s in shapes]  # noqa: E731
    return (t(), t(), t()), dict(lr=[1e-3, 2e-3], beta1=[0.9, 0.8], beta2=[0.99, 0.9], weight_decay=[0.0, 0.1],
                                 l1_weight_decay=[0.01, 0.0], group_sizes=[2, 1], maximize=False)


@pytest.mark.skipif(not _backends.EXTENSION_LOADED, reason="the extension is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(dtype):
    args, kwargs = _op_args(dtype)
    torch.library.opcheck(torch.ops.pyoptim.lion_step_, args, kwargs)
    args, kwargs = _op_args(dtype)
    kwargs.update(grad_scale=torch.tensor(4.0), found_inf=torch.tensor(0.0), grad_norm=torch.tensor(3.0),
                  max_grad_norm=1.0, lr_tensor=torch.tensor([1e-3, 1e-2], dtype=torch.float64))
    torch.library.opcheck(torch.ops.pyoptim.lion_step_, args, kwargs)


@pytest.mark.skipif(not _backends.EXTENSION_LOADED, reason="the extension is not built")
def test_torch_compile_fullgraph():
    args, kwargs = _op_args()
    expected = copy.deepcopy(args)

    def step(p, g, m):
        torch.ops.pyoptim.lion_step_(p, g, m, **kwargs)

    torch.compile(step, fullgraph=True, backend="aot_eager")(*args)
    step(*expected)
    for xs, ys in zip(args, expected):
        for x, y in zip(xs, ys):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_capture(backend):
    # capturable: a Tensor lr read on the device, one captured step replayed against lion-pytorch's eager steps.
    if backend not in _backends.available("lion_step_", "cuda"):
        pytest.skip(f"{backend} is not built here")
    device = torch.device("cuda")
    init = [torch.randn(s, device=device) for s in [(1000,), (65537,), (3, 7)]]
    a = [p.clone().requires_grad_() for p in init]
    b = [p.clone().requires_grad_() for p in init]
    oa = pyoptim.optim.Lion(a, lr=torch.tensor(1e-3, device=device), weight_decay=0.1, capturable=True,
                            backend=backend)
    ob = Oracle(b, lr=1e-3, weight_decay=0.1)
    grads = [[torch.randn_like(p) for p in init] for _ in range(6)]
    for p in a:
        p.grad = torch.zeros_like(p)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up (the state is made here)
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
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **TOL[torch.float32])
