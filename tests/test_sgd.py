"""SGD: every backend against torch.optim.SGD (foreach=False) and the edge cases."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

import pyoptim
from tests.conftest import TOL, device_of, hand_over_state_dict


def run_both(impl, shapes, dtype, steps=10, grads_fn=None, **kwargs):
    device = device_of(impl)
    init = [torch.randn(s, dtype=dtype, device=device) for s in shapes]
    a = [p.clone().requires_grad_() for p in init]
    b = [p.clone().requires_grad_() for p in init]
    oa = pyoptim.optim.SGD(a, backend=impl[1], **kwargs)
    ob = torch.optim.SGD(b, foreach=False, **kwargs)
    for _ in range(steps):
        for x, y in zip(a, b):
            g = grads_fn(x) if grads_fn else torch.randn_like(x)
            x.grad, y.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    return a, b, oa, ob


def assert_same(a, b, oa, ob, dtype):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **TOL[dtype])
        assert set(oa.state[x]) == set(ob.state[y])
        if "momentum_buffer" in ob.state[y]:
            torch.testing.assert_close(oa.state[x]["momentum_buffer"], ob.state[y]["momentum_buffer"], **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("momentum,dampening,nesterov,weight_decay,maximize,tensor_lr", [
    c for c in itertools.product([0.0, 0.9], [0.0, 0.3], [False, True], [0.0, 0.1], [False, True], [False, True])
    if not (c[2] and (c[0] == 0 or c[1] != 0))  # nesterov needs momentum and no dampening
])
def test_matches_torch(sgd_impl, dtype, momentum, dampening, nesterov, weight_decay, maximize, tensor_lr):
    # 0-d, one element, vector width +- 1, a 2-D param.
    shapes = [(), (1,), (15,), (17,), (33,), (4, 5)]
    lr = torch.tensor(0.05, dtype=dtype, device=device_of(sgd_impl)) if tensor_lr else 0.05
    a, b, oa, ob = run_both(sgd_impl, shapes, dtype, lr=lr, momentum=momentum, dampening=dampening,
                            nesterov=nesterov, weight_decay=weight_decay, maximize=maximize)
    assert_same(a, b, oa, ob, dtype)


@pytest.mark.parametrize("shapes", [
    [(0,), (3,)],                       # an empty tensor beside a normal one
    [(16384 + 1,)],                     # a CPU chunk plus one
    [(65536 + 1,)],                     # a CUDA chunk plus one
    [(int(s),) for s in torch.randint(0, 200, (700,))],  # more tensors than one CUDA launch holds
], ids=["empty", "cpu_chunk_plus_one", "cuda_chunk_plus_one", "700_tensors"])
def test_boundary_shapes(sgd_impl, shapes):
    a, b, oa, ob = run_both(sgd_impl, shapes, torch.float32, steps=3, lr=0.1, momentum=0.9)
    assert_same(a, b, oa, ob, torch.float32)


def test_non_contiguous(sgd_impl):
    device = device_of(sgd_impl)
    params = [torch.randn(5, 7, device=device).t(), torch.randn(6, 10, device=device)[:, ::3]]
    a = [torch.empty_strided(p.size(), p.stride(), device=device).copy_(p).requires_grad_() for p in params]
    b = [p.clone().requires_grad_() for p in params]
    oa = pyoptim.optim.SGD(a, lr=0.1, momentum=0.9, weight_decay=0.1, backend=sgd_impl[1])
    ob = torch.optim.SGD(b, lr=0.1, momentum=0.9, weight_decay=0.1, foreach=False)
    for _ in range(4):
        for x, y in zip(a, b):
            g = torch.randn(x.shape[1], x.shape[0], device=device).t()  # other strides than the param
            x.grad, y.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **TOL[torch.float32])
    assert a[0].stride() == params[0].stride()


def test_param_added_later_starts_its_own_buffer(sgd_impl):
    # One call with first-step buffers and one with running buffers.
    device = device_of(sgd_impl)
    p1, p2 = torch.randn(5, device=device), torch.randn(7, device=device)
    a = [p1.clone().requires_grad_(), p2.clone().requires_grad_()]
    b = [p1.clone().requires_grad_(), p2.clone().requires_grad_()]
    oa = pyoptim.optim.SGD(a[:1], lr=0.1, momentum=0.9, backend=sgd_impl[1])
    ob = torch.optim.SGD(b[:1], lr=0.1, momentum=0.9, foreach=False)
    for it in range(4):
        if it == 2:
            oa.add_param_group({"params": a[1:], "lr": 0.2})
            ob.add_param_group({"params": b[1:], "lr": 0.2})
        n = 1 if it < 2 else 2
        for x, y in zip(a[:n], b[:n]):
            g = torch.randn_like(x)
            x.grad, y.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **TOL[torch.float32])
        torch.testing.assert_close(oa.state[x]["momentum_buffer"], ob.state[y]["momentum_buffer"], **TOL[torch.float32])


@pytest.mark.parametrize("direction", ["pyoptim_to_torch", "torch_to_pyoptim"])
def test_state_dict_round_trip(sgd_impl, direction):
    device = device_of(sgd_impl)
    init = [torch.randn(5, device=device), torch.randn(3, 4, device=device)]
    kw = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    a, b, first, second = hand_over_state_dict(
        direction, lambda ps: pyoptim.optim.SGD(ps, backend=sgd_impl[1], **kw),
        lambda ps: torch.optim.SGD(ps, foreach=False, **kw), init)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, **TOL[torch.float32])
        torch.testing.assert_close(first.state[p]["momentum_buffer"], second.state[q]["momentum_buffer"],
                                   **TOL[torch.float32])


def test_grad_scaler_and_scheduler(sgd_impl):
    device = device_of(sgd_impl)
    torch.manual_seed(1)
    ma = torch.nn.Linear(8, 4).to(device)
    mb = copy.deepcopy(ma)
    oa = pyoptim.optim.SGD(ma.parameters(), lr=0.1, momentum=0.9, backend=sgd_impl[1])
    ob = torch.optim.SGD(mb.parameters(), lr=0.1, momentum=0.9, foreach=False)
    sa, sb = torch.amp.GradScaler(device.type, init_scale=256.0), torch.amp.GradScaler(device.type, init_scale=256.0)
    la = torch.optim.lr_scheduler.ExponentialLR(oa, 0.9)
    lb = torch.optim.lr_scheduler.ExponentialLR(ob, 0.9)
    for it in range(5):
        x = torch.randn(16, 8, device=device)
        for model, opt, scaler, sched in ((ma, oa, sa, la), (mb, ob, sb, lb)):
            opt.zero_grad()
            scaler.scale(model(x).square().mean()).backward()
            if it == 2:
                model.bias.grad[0] = float("nan")  # skipped step: nothing changes
            scaler.step(opt)
            scaler.update()
            sched.step()
    for p, q in zip(ma.parameters(), mb.parameters()):
        torch.testing.assert_close(p, q, **TOL[torch.float32])
    assert oa.param_groups[0]["lr"] == ob.param_groups[0]["lr"]


@pytest.mark.parametrize("kwargs,message", [
    (dict(lr=-0.1), "Invalid learning rate: -0.1"),
    (dict(momentum=-0.5), "Invalid momentum value: -0.5"),
    (dict(weight_decay=-1.0), "Invalid weight_decay value: -1.0"),
    (dict(nesterov=True), "Nesterov momentum requires a momentum and zero dampening"),
    (dict(nesterov=True, momentum=0.9, dampening=0.1), "Nesterov momentum requires a momentum and zero dampening"),
])
def test_bad_hyperparameters_raise_torchs_errors(kwargs, message):
    for cls in (torch.optim.SGD, pyoptim.optim.SGD):  # the message is torch's own
        with pytest.raises(ValueError, match="^" + message + "$"):
            cls([torch.zeros(2, requires_grad=True)], **kwargs)


def test_failed_step_changes_nothing(sgd_impl):
    device = device_of(sgd_impl)
    p32 = [torch.randn(4, device=device).requires_grad_()]
    p64 = [torch.randn(4, dtype=torch.float64, device=device).requires_grad_()]
    opt = pyoptim.optim.SGD([{"params": p32}, {"params": p64}], lr=0.1, momentum=0.9, backend=sgd_impl[1])
    for p in p32 + p64:
        p.grad = torch.randn_like(p)
    opt.step()
    before = [p.detach().clone() for p in p32 + p64]
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in p32 + p64]
    opt.param_groups[1]["nesterov"] = True
    opt.param_groups[1]["dampening"] = 0.5  # invalid with nesterov, set behind the constructor's checks
    with pytest.raises(RuntimeError, match="Nesterov"):
        opt.step()
    for p, q, buf in zip(p32 + p64, before, bufs):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=0)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], buf, rtol=0, atol=0)


@pytest.mark.parametrize("kw", [dict(lr=0.1), dict(lr=0.1, momentum=0.9), dict(lr=0.1, momentum=0.9, nesterov=True)],
                         ids=["plain", "momentum", "nesterov"])
def test_sparse_grads_step_as_torchs(sgd_impl, kw):
    """note [sparse grads]: an nn.Embedding(sparse=True) beside a dense Linear steps as torch.optim.SGD steps it."""
    models = []
    for make in (lambda ps: pyoptim.optim.SGD(ps, backend=sgd_impl[1], **kw),
                 lambda ps: torch.optim.SGD(ps, foreach=False, **kw)):
        torch.manual_seed(0)
        emb, lin = torch.nn.Embedding(11, 4, sparse=True), torch.nn.Linear(4, 1)
        models.append((emb, lin, make(list(emb.parameters()) + list(lin.parameters()))))
    torch.manual_seed(1)
    for _ in range(4):
        idx = torch.randint(0, 11, (6,))
        for emb, lin, opt in models:
            opt.zero_grad()
            lin(emb(idx)).square().sum().backward()
            opt.step()
    (e1, l1, _), (e2, l2, _) = models
    for a, b in zip(list(e1.parameters()) + list(l1.parameters()), list(e2.parameters()) + list(l2.parameters())):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


def test_sparse_grad_with_weight_decay_raises_torchs_error_before_any_write(sgd_impl):
    """torch's SGD raises mid-step (after the params before it moved); ours raises the same error first."""
    device = device_of(sgd_impl)
    dense = torch.randn(3, device=device, requires_grad=True)
    p = torch.randn(4, device=device, requires_grad=True)
    opt = pyoptim.optim.SGD([dense, p], lr=0.1, weight_decay=0.1, backend=sgd_impl[1])
    dense.grad = torch.ones(3, device=device)
    p.grad = torch.sparse_coo_tensor([[0]], [1.0], (4,), device=device)
    before = dense.detach().clone(), p.detach().clone()
    with pytest.raises(RuntimeError, match="add\\(sparse, dense\\) is not supported"):
        opt.step()
    assert torch.equal(dense.detach(), before[0]) and torch.equal(p.detach(), before[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_at_least_as_accurate_as_torch(sgd_impl, dtype):
    device = device_of(sgd_impl)
    master = [torch.randn(1000, dtype=torch.float64, device=device)]
    ours = [m.to(dtype).requires_grad_() for m in master]
    theirs = [m.to(dtype).requires_grad_() for m in master]
    exact = [m.to(dtype).double().requires_grad_() for m in master]
    kw = dict(lr=0.05, momentum=0.9, weight_decay=0.1)
    oo = pyoptim.optim.SGD(ours, backend=sgd_impl[1], **kw)
    ot = torch.optim.SGD(theirs, foreach=False, **kw)
    oe = torch.optim.SGD(exact, foreach=False, **kw)
    for _ in range(20):
        g = torch.randn(1000, dtype=torch.float64, device=device).to(dtype)
        ours[0].grad, theirs[0].grad, exact[0].grad = g.clone(), g.clone(), g.double()
        oo.step()
        ot.step()
        oe.step()
    for get in (lambda o, p: p.detach(), lambda o, p: o.state[p]["momentum_buffer"]):
        e_ours = float((get(oo, ours[0]).double() - get(oe, exact[0])).norm())
        e_torch = float((get(ot, theirs[0]).double() - get(oe, exact[0])).norm())
        assert e_ours <= e_torch, (e_ours, e_torch)


@pytest.mark.parametrize("ours_cls,torch_cls,kwargs", [
    (pyoptim.optim.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
    (pyoptim.optim.AdamW, torch.optim.AdamW, dict(lr=1e-2)),
    (pyoptim.optim.Adam, torch.optim.Adam, dict(lr=1e-2, amsgrad=True)),
])
@pytest.mark.parametrize("max_norm", [0.5, 1e3], ids=["clipped", "below_max"])
def test_fused_clip_equals_clip_then_step(sgd_impl, ours_cls, torch_cls, kwargs, max_norm):
    """max_grad_norm == torch.nn.utils.clip_grad_norm_ then torch's step; the grads stay untouched."""
    device = device_of(sgd_impl)
    shapes = [(10,), (3, 7), (), (0,)]
    init = [torch.randn(s, device=device) for s in shapes]
    a = [p.clone().requires_grad_() for p in init]
    b = [p.clone().requires_grad_() for p in init]
    oa = ours_cls(a, max_grad_norm=max_norm, backend=sgd_impl[1], **kwargs)
    ob = torch_cls(b, foreach=False, **kwargs)
    for _ in range(10):
        for x, y in zip(a, b):
            g = torch.randn_like(x) * 3
            x.grad, y.grad = g.clone(), g.clone()
        grads_before = [x.grad.clone() for x in a]
        oa.step()
        expected_norm = torch.nn.utils.clip_grad_norm_(b, max_norm)
        ob.step()
        torch.testing.assert_close(oa.grad_norm, expected_norm, rtol=1e-5, atol=0)
        for x, g in zip(a, grads_before):
            torch.testing.assert_close(x.grad, g, rtol=0, atol=0)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **TOL[torch.float32])


def test_fused_clip_under_grad_scaler(sgd_impl):
    device = device_of(sgd_impl)
    torch.manual_seed(2)
    ma = torch.nn.Linear(8, 4).to(device)
    mb = copy.deepcopy(ma)
    oa = pyoptim.optim.AdamW(ma.parameters(), lr=1e-2, max_grad_norm=0.1, backend=sgd_impl[1])
    ob = torch.optim.AdamW(mb.parameters(), lr=1e-2, foreach=False)
    sa, sb = torch.amp.GradScaler(device.type, init_scale=512.0), torch.amp.GradScaler(device.type, init_scale=512.0)
    for it in range(4):
        x = torch.randn(16, 8, device=device)
        oa.zero_grad()
        sa.scale(ma(x).square().mean()).backward()
        sa.step(oa)
        sa.update()
        ob.zero_grad()
        sb.scale(mb(x).square().mean()).backward()
        sb.unscale_(ob)
        norm = torch.nn.utils.clip_grad_norm_(mb.parameters(), 0.1)
        sb.step(ob)
        sb.update()
        torch.testing.assert_close(oa.grad_norm, norm, rtol=1e-5, atol=0)  # the norm of the unscaled grads
    for p, q in zip(ma.parameters(), mb.parameters()):
        torch.testing.assert_close(p, q, **TOL[torch.float32])


@pytest.mark.skipif(not pyoptim._backends.EXTENSION_LOADED, reason="the extension is not built")
def test_opcheck_and_compile():
    def args():
        ps = [torch.randn(5), torch.randn(2, 3)]
        return (ps, [torch.randn_like(p) for p in ps], [torch.randn_like(p) for p in ps]), dict(
            lr=[0.1, 0.2], momentum=[0.9, 0.5], dampening=[0.0, 0.1], weight_decay=[0.0, 0.01], group_sizes=[1, 1],
            nesterov=False, maximize=False, is_first_step=False)

    a, kw = args()
    torch.library.opcheck(torch.ops.pyoptim.sgd_step_, a, kw)
    a, kw = args()
    kw.update(grad_norm=torch.tensor(10.0), max_grad_norm=1.0, grad_scale=torch.tensor(2.0))
    torch.library.opcheck(torch.ops.pyoptim.sgd_step_, a, kw)
    a, kw = args()
    expected = copy.deepcopy(a)

    def step(p, g, b):
        torch.ops.pyoptim.sgd_step_(p, g, b, **kw)

    torch.compile(step, fullgraph=True, backend="aot_eager")(*a)
    step(*expected)
    for xs, ys in zip(a, expected):
        for x, y in zip(xs, ys):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("momentum,weight_decay,maximize", [(0.0, 0.0, False), (0.9, 0.01, False), (0.9, 0.0, True)])
def test_l1_equals_torch_on_the_l1_regularized_loss(sgd_impl, momentum, weight_decay, maximize):
    # The step of loss + l1 * sum(|p|): torch fed grad + l1 * sign(p) (with maximize, torch negates what it is
    # fed, and ours adds l1 * sign(p) after maximize's sign: L1 pulls towards 0 either way).
    device = device_of(sgd_impl)
    init = [torch.randn(s, device=device) for s in [(), (17,), (4, 5)]]
    init[1][3] = 0.0  # sign(0) = 0: no pull on a zero
    a = [p.clone().requires_grad_() for p in init]
    b = [p.clone().requires_grad_() for p in init]
    l1 = 0.05
    kw = dict(lr=0.05, momentum=momentum, weight_decay=weight_decay, maximize=maximize)
    oa = pyoptim.optim.SGD(a, l1_weight_decay=l1, backend=sgd_impl[1], **kw)
    ob = torch.optim.SGD(b, foreach=False, **kw)
    for _ in range(10):
        for x, y in zip(a, b):
            g = torch.randn_like(x)
            x.grad = g.clone()
            pull = l1 * torch.sign(y.detach())
            y.grad = g - pull if maximize else g + pull
        oa.step()
        ob.step()
    assert_same(a, b, oa, ob, torch.float32)


def test_bad_l1_weight_decay_raises():
    with pytest.raises(ValueError, match=r"^Invalid l1_weight_decay value: -0.1$"):
        pyoptim.optim.SGD([torch.zeros(2, requires_grad=True)], l1_weight_decay=-0.1)


@pytest.mark.skipif(not pyoptim._backends.EXTENSION_LOADED, reason="the extension is not built")
def test_opcheck_with_l1():
    ps = [torch.randn(5), torch.randn(2, 3)]
    args = (ps, [torch.randn_like(p) for p in ps], [torch.randn_like(p) for p in ps])
    torch.library.opcheck(torch.ops.pyoptim.sgd_step_, args, dict(
        lr=[0.1, 0.2], momentum=[0.9, 0.5], dampening=[0.0, 0.1], weight_decay=[0.0, 0.01],
        l1_weight_decay=[0.01, 0.0], group_sizes=[1, 1], nesterov=False, maximize=False, is_first_step=False))
