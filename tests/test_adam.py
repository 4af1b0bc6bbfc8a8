"""Adam / AdamW: every backend against torch.optim (foreach=False) and the edge cases."""

from __future__ import annotations

import copy
import itertools
import os
import subprocess
import sys

import pytest
import torch

import pyoptim
from pyoptim import _backends
from tests.conftest import TOL, hand_over_state_dict, requires_cuda

OPT_PAIRS = [(pyoptim.optim.Adam, torch.optim.Adam), (pyoptim.optim.AdamW, torch.optim.AdamW)]
STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step")


def _device(impl):
    return torch.device("cuda" if impl[0] == "cuda" else "cpu")


def make_params(shapes, dtype, device, make=None):
    make = make or (lambda s: torch.randn(s, dtype=dtype, device=device))
    return [make(s).requires_grad_() for s in shapes]


def run_both(ours_cls, torch_cls, params, steps=10, kwargs=None, backend=None, torch_kwargs=None, grads_fn=None):
    """Step pyoptim and torch (foreach=False) on copies of `params` with the same grads; return both optimizers."""
    kwargs = kwargs or {}
    a = [p.detach().clone().requires_grad_() if p.is_contiguous() else _same_layout(p) for p in params]
    b = [p.detach().clone().requires_grad_() if p.is_contiguous() else _same_layout(p) for p in params]
    oa = ours_cls(a, backend=backend, **kwargs)
    ob = torch_cls(b, foreach=False, **(torch_kwargs if torch_kwargs is not None else kwargs))
    for _ in range(steps):
        for x, y in zip(a, b):
            g = grads_fn(x) if grads_fn else torch.randn_like(x)
            x.grad = g.clone()
            y.grad = g.clone()
        oa.step()
        ob.step()
    return a, b, oa, ob


def _same_layout(p):
    """A leaf with p's values and p's (non-contiguous) strides."""
    q = torch.empty_strided(p.size(), p.stride(), dtype=p.dtype, device=p.device)
    return q.copy_(p.detach()).requires_grad_()


def assert_same(a, b, oa, ob, dtype):
    tol = TOL[dtype]
    for x, y in zip(a, b):
        torch.testing.assert_close(x.detach(), y.detach(), **tol)
        sa, sb = oa.state[x], ob.state[y]
        for k in STATE_KEYS:
            assert (k in sa) == (k in sb), k
            if k in sa:
                va, vb = sa[k], sb[k]
                if k == "step":
                    assert float(va) == float(vb)
                else:
                    torch.testing.assert_close(va, vb, **tol)


# -- against torch, every option ---------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("cls_pair", OPT_PAIRS, ids=lambda p: p[0].__name__)
@pytest.mark.parametrize("amsgrad,maximize,weight_decay,tensor_lr",
                         list(itertools.product([False, True], [False, True], [0.0, 0.1], [False, True])))
def test_matches_torch(adam_impl, dtype, cls_pair, amsgrad, maximize, weight_decay, tensor_lr):
    device = _device(adam_impl)
    # 0-d, one element, and a vector width +- 1 for 8- and 16-lane float vectors.
    shapes = [(), (1,), (15,), (17,), (33,), (4, 5)]
    params = make_params(shapes, dtype, device)
    # A tensor lr in the params' dtype: torch computes lr / bc1 in the lr
    # tensor's dtype (a float32 lr would cost fp64 params 1e-10 relative).
    lr = torch.tensor(1e-2, dtype=dtype, device=device) if tensor_lr else 1e-2
    kwargs = dict(lr=lr, betas=(0.8, 0.99), eps=1e-6, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
    a, b, oa, ob = run_both(*cls_pair, params, steps=10, kwargs=kwargs, backend=adam_impl[1])
    assert_same(a, b, oa, ob, dtype)


@pytest.mark.parametrize("shape", [
    (0,),          # no elements: nothing to update, the step still advances
    (16384 + 1,),  # a CPU chunk plus one: the last chunk holds one element
    (65536 + 1,),  # a CUDA chunk plus one
    (7, 9),
], ids=str)
def test_boundary_shapes(adam_impl, shape):
    device = _device(adam_impl)
    params = make_params([shape, (3,)], torch.float32, device)
    a, b, oa, ob = run_both(*OPT_PAIRS[1], params, steps=3, kwargs=dict(lr=1e-2), backend=adam_impl[1])
    assert_same(a, b, oa, ob, torch.float32)


def test_more_tensors_than_one_launch(adam_impl):
    # 700 tensors of mixed sizes: more than a CUDA launch holds (320), and
    # several launch groups' boundaries fall between chunks of a tensor.
    device = _device(adam_impl)
    sizes = [(int(s),) for s in torch.randint(0, 300, (700,))]
    params = make_params(sizes, torch.float32, device)
    a, b, oa, ob = run_both(*OPT_PAIRS[1], params, steps=2, kwargs=dict(lr=1e-2), backend=adam_impl[1])
    assert_same(a, b, oa, ob, torch.float32)


def test_thousands_of_small_tensors(adam_impl):
    if adam_impl[1] == "triton" and adam_impl[0] == "cpu":
        n = 500  # the interpreter pays per program; 500 still spans several launch groups
    else:
        n = 3000
    device = _device(adam_impl)
    params = make_params([(8,)] * n, torch.float32, device)
    a, b, oa, ob = run_both(*OPT_PAIRS[1], params, steps=2, kwargs=dict(lr=1e-2), backend=adam_impl[1])
    assert_same(a, b, oa, ob, torch.float32)


def test_non_contiguous(adam_impl):
    device = _device(adam_impl)
    params = [
        torch.randn(5, 7, device=device).t().requires_grad_(),  # dense, transposed strides
        torch.randn(6, 10, device=device)[:, ::3].requires_grad_(),  # gaps: not dense
        torch.randn(4, 4, device=device).requires_grad_(),
    ]
    assert not params[0].is_contiguous() and not params[1].is_contiguous()

    # Grads in other layouts than their params: column-major for a row-major
    # param, contiguous for a transposed one.
    def grads_fn(p):
        if p.dim() == 2 and p.is_contiguous():
            return torch.randn(p.shape[1], p.shape[0], device=device).t()
        return torch.randn(p.shape, device=device)

    a, b, oa, ob = run_both(*OPT_PAIRS[1], params, steps=5, kwargs=dict(lr=1e-2, weight_decay=0.1),
                            backend=adam_impl[1], grads_fn=grads_fn)
    assert_same(a, b, oa, ob, torch.float32)
    # The param keeps its own strides.
    assert a[0].stride() == params[0].stride() and a[1].stride() == params[1].stride()


def test_param_groups_and_mixed_dtypes(adam_impl):
    device = _device(adam_impl)
    p1 = make_params([(10,), (3, 3)], torch.float32, device)
    p2 = make_params([(7,)], torch.float64, device) + make_params([(5,)], torch.float32, device)
    p3 = make_params([(4,)], torch.float32, device)

    def groups(ps):
        return [
            {"params": ps[:2], "lr": 1e-2},
            {"params": ps[2:4], "lr": 3e-2, "betas": (0.5, 0.9), "weight_decay": 0.2},
            {"params": ps[4:], "eps": 1e-3, "amsgrad": True},
        ]

    ps = p1 + p2 + p3
    a = [p.detach().clone().requires_grad_() for p in ps]
    b = [p.detach().clone().requires_grad_() for p in ps]
    oa = pyoptim.optim.AdamW(groups(a), backend=adam_impl[1])
    ob = torch.optim.AdamW(groups(b), foreach=False)
    for _ in range(10):
        for x, y in zip(a, b):
            g = torch.randn_like(x)
            x.grad, y.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **TOL[x.dtype])
        for k in STATE_KEYS:
            if k in ob.state[y]:
                torch.testing.assert_close(oa.state[x][k].cpu().to(ob.state[y][k].dtype), ob.state[y][k].cpu(),
                                           **TOL[x.dtype])


def test_params_without_grad_are_skipped(adam_impl):
    device = _device(adam_impl)
    a = make_params([(4,), (4,)], torch.float32, device)
    before = a[1].detach().clone()
    opt = pyoptim.optim.AdamW(a, backend=adam_impl[1])
    a[0].grad = torch.randn(4, device=device)
    opt.step()
    assert a[1] not in opt.state
    torch.testing.assert_close(a[1].detach(), before, rtol=0, atol=0)
    assert float(opt.state[a[0]]["step"]) == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_at_least_as_accurate_as_torch(adam_impl, dtype):
    """Error against a float64 run, for params and both moments: ours (fp32 math, one rounding per stored
    value) is no worse than torch's for-loop (which rounds after every op)."""
    device = _device(adam_impl)
    shapes = [(1000,), (33, 17)]
    master = [torch.randn(s, dtype=torch.float64, device=device) for s in shapes]
    ours = [m.to(dtype).requires_grad_() for m in master]
    theirs = [m.to(dtype).requires_grad_() for m in master]
    exact = [m.to(dtype).double().requires_grad_() for m in master]
    # lr large enough that updates survive rounding to the storage dtype.
    kw = dict(lr=1e-2, weight_decay=0.1)
    oo = pyoptim.optim.AdamW(ours, backend=adam_impl[1], **kw)
    ot = torch.optim.AdamW(theirs, foreach=False, **kw)
    oe = torch.optim.AdamW(exact, foreach=False, **kw)
    for _ in range(20):
        for x, y, z in zip(ours, theirs, exact):
            g = torch.randn(x.shape, dtype=torch.float64, device=device).to(dtype)
            x.grad, y.grad, z.grad = g.clone(), g.clone(), g.double()
        oo.step()
        ot.step()
        oe.step()

    def rel_err(opt, ps, key):
        num = den = 0.0
        for x, z in zip(ps, exact):
            a = x.detach().double() if key is None else opt.state[x][key].double()
            b = z.detach() if key is None else oe.state[z][key]
            num += float((a - b).norm() ** 2)
            den += float(b.norm() ** 2)
        return (num / den) ** 0.5

    for key in (None, "exp_avg", "exp_avg_sq"):
        e_ours, e_torch = rel_err(oo, ours, key), rel_err(ot, theirs, key)
        # 1 + 1e-6: where both errors are the storage dtype's rounding of the same values (bf16 exp_avg),
        # they agree to ~1e-10 and one element rounded the other way tips the order.
        assert e_ours <= e_torch * (1 + 1e-6), (key or "param", e_ours, e_torch)


# -- the API: state_dict, schedulers, GradScaler, hooks, closures --------------


@pytest.mark.parametrize("direction", ["pyoptim_to_torch", "torch_to_pyoptim"])
def test_state_dict_round_trip(adam_impl, direction):
    device = _device(adam_impl)
    init = [torch.randn(5, device=device), torch.randn(3, 4, device=device)]
    kw = dict(lr=1e-2, amsgrad=True, weight_decay=0.05)
    a, b, first, second = hand_over_state_dict(
        direction, lambda ps: pyoptim.optim.AdamW(ps, backend=adam_impl[1], **kw),
        lambda ps: torch.optim.AdamW(ps, foreach=False, **kw), init)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, **TOL[torch.float32])
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            torch.testing.assert_close(first.state[p][k], second.state[q][k], **TOL[torch.float32])
        assert float(first.state[p]["step"]) == float(second.state[q]["step"]) == 6


def test_state_keys_and_types_match_torch():
    a = make_params([(3,)], torch.float32, "cpu")
    b = [a[0].detach().clone().requires_grad_()]
    oa, ob = pyoptim.optim.AdamW(a, amsgrad=True), torch.optim.AdamW(b, amsgrad=True)
    a[0].grad, b[0].grad = torch.ones(3), torch.ones(3)
    oa.step()
    ob.step()
    sa, sb = oa.state_dict(), ob.state_dict()
    assert set(sa["state"][0]) == set(sb["state"][0])
    for k, v in sb["state"][0].items():
        assert sa["state"][0][k].dtype == v.dtype and sa["state"][0][k].shape == v.shape
    assert set(sb["param_groups"][0]) <= set(sa["param_groups"][0])


def test_lr_scheduler(adam_impl):
    device = _device(adam_impl)
    params = make_params([(6,)], torch.float32, device)
    a = [params[0].detach().clone().requires_grad_()]
    b = [params[0].detach().clone().requires_grad_()]
    oa, ob = pyoptim.optim.AdamW(a, lr=0.1, backend=adam_impl[1]), torch.optim.AdamW(b, lr=0.1, foreach=False)
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


def _amp_models(device, backend):
    torch.manual_seed(1)
    model_a = torch.nn.Linear(8, 4).to(device)
    model_b = copy.deepcopy(model_a)
    opt_a = pyoptim.optim.AdamW(model_a.parameters(), lr=1e-2, backend=backend)
    opt_b = torch.optim.AdamW(model_b.parameters(), lr=1e-2, foreach=False)
    return model_a, model_b, opt_a, opt_b


def test_grad_scaler(adam_impl):
    device = _device(adam_impl)
    model_a, model_b, opt_a, opt_b = _amp_models(device, adam_impl[1])
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
                state_before = copy.deepcopy(opt.state_dict()["state"])
            scaler.step(opt)
            scaler.update()
            if it == 2:
                for p, q in zip(model.parameters(), before):
                    torch.testing.assert_close(p.detach(), q, rtol=0, atol=0)
                for k, st in opt.state_dict()["state"].items():
                    for name, v in st.items():
                        torch.testing.assert_close(v, state_before[k][name], rtol=0, atol=0)
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(p, q, **TOL[torch.float32])
    assert scaler_a.get_scale() == scaler_b.get_scale()


def test_closure_hooks_and_zero_grad():
    p = make_params([(3,)], torch.float32, "cpu")[0]
    opt = pyoptim.optim.Adam([p], lr=0.1)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))

    def closure():
        opt.zero_grad()
        loss = (p * p).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and calls == ["pre", "post"]
    opt.zero_grad()
    assert p.grad is None


def test_complex_params_match_torch():
    p = torch.randn(6, dtype=torch.complex64)
    a, b = [p.clone().requires_grad_()], [p.clone().requires_grad_()]
    oa, ob = pyoptim.optim.AdamW(a, lr=1e-2), torch.optim.AdamW(b, lr=1e-2, foreach=False)
    for _ in range(5):
        g = torch.randn(6, dtype=torch.complex64)
        a[0].grad, b[0].grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    torch.testing.assert_close(a[0], b[0], **TOL[torch.float32])


# -- bad input, and exception safety -------------------------------------------


@pytest.mark.parametrize("kwargs,message", [
    (dict(lr=-1.0), "Invalid learning rate: -1.0"),
    (dict(eps=-1.0), "Invalid epsilon value: -1.0"),
    (dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0: 1.0"),
    (dict(betas=(0.9, -0.1)), "Invalid beta parameter at index 1: -0.1"),
    (dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
])
@pytest.mark.parametrize("cls_pair", OPT_PAIRS, ids=lambda p: p[0].__name__)
def test_bad_hyperparameters_raise_torchs_errors(kwargs, message, cls_pair):
    ours, theirs = cls_pair
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)") + "$"):
        theirs([torch.zeros(2, requires_grad=True)], **kwargs)  # the message is torch's own
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)") + "$"):
        ours([torch.zeros(2, requires_grad=True)], **kwargs)


def test_sparse_grad_raises(adam_impl):
    device = _device(adam_impl)
    p = make_params([(4,)], torch.float32, device)[0]
    opt = pyoptim.optim.Adam([p], backend=adam_impl[1])
    p.grad = torch.sparse_coo_tensor([[0]], [1.0], (4,), device=device)
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
    assert p not in opt.state


def test_duplicate_param_raises():
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="duplicate parameters"):
        pyoptim.optim.Adam([p, p])
    with pytest.raises(ValueError, match="more than one parameter group"):
        pyoptim.optim.Adam([{"params": [p]}, {"params": [p]}])


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="unknown backend"):
        pyoptim.optim.Adam([torch.zeros(2, requires_grad=True)], backend="opencl")


def _snapshot(params, opt):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


def _assert_unchanged(params, opt, snap):
    before_params, before_sd = snap
    for p, q in zip(params, before_params):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=0)
    sd = opt.state_dict()
    assert sd["state"].keys() == before_sd["state"].keys()
    for k, st in sd["state"].items():
        for name, v in st.items():
            torch.testing.assert_close(v, before_sd["state"][k][name], rtol=0, atol=0)


def test_failed_step_changes_nothing_one_call(adam_impl):
    device = _device(adam_impl)
    params = make_params([(4,), (5,)], torch.float32, device)
    opt = pyoptim.optim.AdamW(params, backend=adam_impl[1])
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    opt.state[params[1]]["exp_avg"] = torch.zeros(6, device=device)  # a corrupt state: wrong shape
    snap = _snapshot(params, opt)
    with pytest.raises(RuntimeError, match=r"exp_avgs\[1\] has shape"):
        opt.step()
    _assert_unchanged(params, opt, snap)


def test_failed_step_changes_nothing_across_groups(adam_impl):
    # Two kernel calls (fp32 and fp64 groups); the second call's bad argument
    # must stop the first from writing.
    device = _device(adam_impl)
    p32 = make_params([(4,)], torch.float32, device)
    p64 = make_params([(4,)], torch.float64, device)
    opt = pyoptim.optim.AdamW([{"params": p32}, {"params": p64}], backend=adam_impl[1])
    for p in p32 + p64:
        p.grad = torch.randn_like(p)
    opt.param_groups[1]["betas"] = (1.5, 0.999)  # set behind the constructor's checks
    snap = _snapshot(p32 + p64, opt)
    with pytest.raises(RuntimeError, match="Invalid beta parameter at index 0"):
        opt.step()
    _assert_unchanged(p32 + p64, opt, snap)
    assert len(opt.state) == 0  # the first step's new state was not kept


def test_op_errors_name_the_index():
    p = [torch.zeros(3), torch.zeros(3)]
    with pytest.raises(RuntimeError, match=r"adam_step_: grads\[1\] has dtype"):
        pyoptim.functional.adam_step_(
            p, [torch.zeros(3), torch.zeros(3, dtype=torch.float64)], [torch.zeros(3)] * 2, [torch.zeros(3)] * 2,
            [], [torch.zeros(()), torch.zeros(())], lr=[1e-3], beta1=[0.9], beta2=[0.999], weight_decay=[0.0],
            eps=[1e-8], backend="cpu")


def test_empty_list_is_a_no_op():
    pyoptim.functional.adam_step_([], [], [], [], [], [], lr=[1e-3], beta1=[0.9], beta2=[0.999], weight_decay=[0.0],
                                  eps=[1e-8])
    opt = pyoptim.optim.AdamW([torch.zeros(2, requires_grad=True)])
    opt.step()  # no grads at all
    assert len(opt.state) == 0


# -- the op: opcheck, backends, info -------------------------------------------


def _op_args(n=3, dtype=torch.float32, amsgrad=True):
    shapes = [(5,), (2, 3), ()][:n]
    t = lambda: [torch.randn(s, dtype=dtype) for s in shapes]  # noqa: E731
    vs = [x.abs() for x in t()]
    return (t(), t(), t(), vs, [v.clone() for v in vs], [torch.tensor(2.0) for _ in shapes]), dict(
        lr=[1e-3, 2e-3], beta1=[0.9, 0.8], beta2=[0.999, 0.99], weight_decay=[0.0, 0.1], eps=[1e-8, 1e-6],
        group_sizes=[2, n - 2], amsgrad=amsgrad, maximize=False, decoupled_weight_decay=True)


@pytest.mark.skipif(not _backends.EXTENSION_LOADED, reason="the extension is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(dtype):
    args, kwargs = _op_args(dtype=dtype)
    torch.library.opcheck(torch.ops.pyoptim.adam_step_, args, kwargs)
    args, kwargs = _op_args(dtype=dtype)
    kwargs.update(grad_scale=torch.tensor(4.0), found_inf=torch.tensor(0.0),
                  lr_tensor=torch.tensor([1e-3, 1e-2], dtype=torch.float64))
    torch.library.opcheck(torch.ops.pyoptim.adam_step_, args, kwargs)


def test_every_backend_agrees_with_reference():
    # The op's contract (per-group lists, grad_scale, found_inf) through each
    # backend against reference.adam_step_ref directly.
    for device_type, backend in [i for i in _backends_pairs() if i[1] != "reference"]:
        args, kwargs = _op_args()
        args = tuple([t.to(device_type) for t in lst] for lst in args)
        kwargs["grad_scale"] = torch.tensor(8.0, device=device_type)
        ref = copy.deepcopy(args)
        pyoptim.functional.adam_step_(*args, **kwargs, backend=backend)
        pyoptim.reference.adam_step_ref(*ref, **kwargs)
        for xs, ys in zip(args, ref):
            for x, y in zip(xs, ys):
                torch.testing.assert_close(x, y, **TOL[torch.float32])


def _backends_pairs():
    from tests.conftest import impls
    return impls("adam_step_")


def test_found_inf_skips_everything(adam_impl):
    device = _device(adam_impl)
    args, kwargs = _op_args()
    args = tuple([t.to(device) for t in lst] for lst in args)
    before = copy.deepcopy(args)
    kwargs["found_inf"] = torch.tensor(1.0, device=device)
    pyoptim.functional.adam_step_(*args, **kwargs, backend=adam_impl[1])
    for xs, ys in zip(args, before):
        for x, y in zip(xs, ys):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_backend_info():
    info = pyoptim.backend_info()
    assert isinstance(info["cuda_archs"], list)
    assert all(a.startswith("sm_") for a in info["cuda_archs"])
    assert info["ops"]["adam_step_"]["cpu"]["default"] in ("cpu", "reference")
    out = subprocess.run([sys.executable, "-m", "pyoptim", "info", "--compact"], capture_output=True, text=True,
                         check=True)
    assert '"cuda_archs"' in out.stdout


def test_env_selects_backend(monkeypatch):
    monkeypatch.setenv("PYOPTIM_BACKEND", "reference")
    assert _backends.select("adam_step_", "cpu") == "reference"
    monkeypatch.setenv("PYOPTIM_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown backend"):
        _backends.select("adam_step_", "cpu")


def test_import_without_extension_warns_and_falls_back():
    code = (
        "import sys, warnings; sys.modules['pyoptim._C'] = None\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always'); import pyoptim\n"
        "assert any('falling back' in str(x.message) for x in w), [str(x.message) for x in w]\n"
        "import torch; p = torch.zeros(3, requires_grad=True); p.grad = torch.ones(3)\n"
        "o = pyoptim.optim.AdamW([p]); o.step(); assert p.detach().abs().sum() > 0\n"
        "assert pyoptim.backend_info()['ops']['adam_step_']['cpu']['default'] == 'reference'\n"
        "assert pyoptim.backend_info()['cuda_archs'] == []\n"
    )
    env = dict(os.environ, PYOPTIM_BACKEND="")
    env.pop("PYOPTIM_BACKEND")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# -- CUDA only -------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_capture(backend):
    if backend not in _backends.available("adam_step_", "cuda"):
        pytest.skip(f"{backend} is not built here")
    device = torch.device("cuda")
    init = [torch.randn(s, device=device) for s in [(1000,), (65537,), (3, 7)]]
    a = [p.clone().requires_grad_() for p in init]
    b = [p.clone().requires_grad_() for p in init]
    oa = pyoptim.optim.AdamW(a, lr=torch.tensor(1e-2, device=device), capturable=True, backend=backend)
    ob = torch.optim.AdamW(b, lr=torch.tensor(1e-2, device=device), capturable=True, foreach=False)
    grads = [[torch.randn_like(p) for p in init] for _ in range(8)]
    for p in a:
        p.grad = torch.zeros_like(p)
    # Warm up on a side stream (state is created there), then capture one step.
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
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
            if i == 4:
                oa.param_groups[0]["lr"].fill_(5e-3)  # read on the device at replay
            graph.replay()
        for p, g in zip(b, gs):
            p.grad = g.clone()
        if i == 4:
            ob.param_groups[0]["lr"].fill_(5e-3)
        ob.step()
    torch.cuda.synchronize()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **TOL[torch.float32])
        assert float(oa.state[x]["step"]) == float(ob.state[y]["step"]) == 8


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_over_2_pow_31_elements(backend):
    if backend not in _backends.available("adam_step_", "cuda"):
        pytest.skip(f"{backend} is not built here")
    n = 2**31 + 4099  # int32 indexing would wrap; the odd tail also crosses a chunk
    free, _ = torch.cuda.mem_get_info()
    if free < 5 * n * 2 + (1 << 30):
        pytest.skip(f"needs {5 * n * 2 >> 30} GiB of free GPU memory")
    device = torch.device("cuda")
    p = torch.randn(n, dtype=torch.bfloat16, device=device)
    g = torch.randn(n, dtype=torch.bfloat16, device=device)
    m = torch.randn(n, dtype=torch.bfloat16, device=device) * 0.1
    v = torch.rand(n, dtype=torch.bfloat16, device=device)
    windows = [slice(0, 4096), slice(2**31 - 2048, 2**31 + 2048), slice(n - 4096, n)]
    ref = [[t[w].clone() for t in (p, g, m, v)] for w in windows]
    step = torch.zeros((), device=device)
    kw = dict(lr=[1e-2], beta1=[0.9], beta2=[0.999], weight_decay=[0.1], eps=[1e-8], group_sizes=[1],
              amsgrad=False, maximize=False, decoupled_weight_decay=True)
    pyoptim.functional.adam_step_([p], [g], [m], [v], [], [step], **kw, backend=backend)
    for w, (rp, rg, rm, rv) in zip(windows, ref):
        pyoptim.reference.adam_step_ref([rp], [rg], [rm], [rv], [], [torch.zeros((), device=device)], **kw)
        torch.testing.assert_close(p[w], rp, rtol=0, atol=0)
        torch.testing.assert_close(m[w], rm, rtol=0, atol=0)
        torch.testing.assert_close(v[w], rv, rtol=0, atol=0)


@pytest.mark.skipif(not _backends.EXTENSION_LOADED, reason="the extension is not built")
def test_torch_compile_fullgraph():
    args, kwargs = _op_args()
    expected = copy.deepcopy(args)

    def step(p, g, m, v, vm, s):
        torch.ops.pyoptim.adam_step_(p, g, m, v, vm, s, **kwargs)

    torch.compile(step, fullgraph=True, backend="aot_eager")(*args)
    step(*expected)
    for xs, ys in zip(args, expected):
        for x, y in zip(xs, ys):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("change", ["reset_state", "replace_tensor", "drop_grad", "new_group"])
def test_changes_between_steps_match_torch(adam_impl, change):
    # note [step plan]: steps after the first reuse the recorded buckets; any
    # change to the params, their grads or their state must still be seen.
    device = _device(adam_impl)
    init = [torch.randn(s, device=device) for s in [(5,), (3, 4), (7,)]]
    a = [p.clone().requires_grad_() for p in init]
    b = [p.clone().requires_grad_() for p in init]
    oa = pyoptim.optim.AdamW(a[:2], lr=1e-2, backend=adam_impl[1])
    ob = torch.optim.AdamW(b[:2], lr=1e-2, foreach=False)
    for it in range(6):
        if it == 3:
            if change == "reset_state":
                del oa.state[a[0]]
                del ob.state[b[0]]
            elif change == "replace_tensor":
                oa.state[a[1]]["exp_avg"] = torch.ones_like(a[1])
                ob.state[b[1]]["exp_avg"] = torch.ones_like(b[1])
            elif change == "new_group":
                oa.add_param_group({"params": [a[2]], "lr": 3e-2})
                ob.add_param_group({"params": [b[2]], "lr": 3e-2})
        for i, (x, y) in enumerate(zip(a, b)):
            g = torch.randn_like(x)
            skip = change == "drop_grad" and it == 4 and i == 0
            x.grad, y.grad = (None, None) if skip else (g.clone(), g.clone())
        oa.step()
        ob.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **TOL[torch.float32])


# -- L1 regularization (l1_weight_decay) -------------------------------------------


@pytest.mark.parametrize("cls_pair", OPT_PAIRS, ids=lambda p: p[0].__name__)
@pytest.mark.parametrize("weight_decay,maximize", [(0.0, False), (0.1, False), (0.1, True)])
def test_l1_equals_torch_on_the_l1_regularized_loss(adam_impl, cls_pair, weight_decay, maximize):
    # The step of loss + l1 * sum(|p|): torch fed grad + l1 * sign(p) (with maximize, torch negates what it is fed,
    # and ours adds l1 * sign(p) after maximize's sign: L1 pulls towards 0 either way). A second group without L1.
    ours_cls, torch_cls = cls_pair
    device = _device(adam_impl)
    init = [torch.randn(s, device=device) for s in [(), (17,), (4, 5), (9,)]]
    init[1][3] = 0.0  # sign(0) = 0: no pull on a zero
    a = [p.clone().requires_grad_() for p in init]
    b = [p.clone().requires_grad_() for p in init]
    l1 = 0.05
    kw = dict(lr=1e-2, weight_decay=weight_decay, maximize=maximize)
    oa = ours_cls([{"params": a[:3], "l1_weight_decay": l1}, {"params": a[3:]}], backend=adam_impl[1], **kw)
    ob = torch_cls([{"params": b[:3]}, {"params": b[3:]}], foreach=False, **kw)
    for _ in range(10):
        for i, (x, y) in enumerate(zip(a, b)):
            g = torch.randn_like(x)
            x.grad = g.clone()
            pull = l1 * torch.sign(y.detach()) if i < 3 else 0.0
            y.grad = g - pull if maximize else g + pull
        oa.step()
        ob.step()
    assert_same(a, b, oa, ob, torch.float32)
    assert oa.param_groups[1]["l1_weight_decay"] == 0.0


def test_bad_l1_weight_decay_raises():
    for cls in (pyoptim.optim.Adam, pyoptim.optim.AdamW):
        with pytest.raises(ValueError, match=r"^Invalid l1_weight_decay value: -0.1$"):
            cls([torch.zeros(2, requires_grad=True)], l1_weight_decay=-0.1)


def test_bad_l1_weight_decay_in_a_group_raises_before_writing(adam_impl):
    device = _device(adam_impl)
    params = make_params([(4,), (5,)], torch.float32, device)
    opt = pyoptim.optim.AdamW(params, backend=adam_impl[1])
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    opt.param_groups[0]["l1_weight_decay"] = -1.0  # behind the constructor's check
    snap = _snapshot(params, opt)
    with pytest.raises(RuntimeError, match="Invalid l1_weight_decay value: -1"):
        opt.step()
    _assert_unchanged(params, opt, snap)


@pytest.mark.skipif(not _backends.EXTENSION_LOADED, reason="the extension is not built")
def test_opcheck_with_l1():
    args, kwargs = _op_args()
    torch.library.opcheck(torch.ops.pyoptim.adam_step_, args, dict(kwargs, l1_weight_decay=[0.01, 0.0]))
