"""LAMB: every backend against a float64 LAMB written here from the paper's formula, and the edge cases."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

import pyoptim
from pyoptim import _backends
from tests.conftest import TOL, device_of, hand_over_state_dict, requires_cuda

SHAPES = [(), (1,), (17,), (4, 5), (1025,)]  # 0-d, one element, a vector width + 1, 2-D, a Triton block + 1


class Float64Lamb:
    """LAMB (You et al., 2019, Algorithm 2, with Adam's bias correction) in float64, one tensor at a time:
    m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2; u = m_hat / (sqrt(v_hat) + eps) + wd p;
    p -= lr * (||p|| / ||u||) * u, the ratio 1 where either norm is 0."""

    def __init__(self, params, lr, betas, eps, weight_decay, storage=None):
        self.params = [p.detach().double().clone() for p in params]
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.storage = storage  # round p, m, v to this dtype after each step (what a low-precision state holds)
        self.t = 0

    def step(self, grads, lrs=None):
        self.t += 1
        for i, (p, g) in enumerate(zip(self.params, grads)):
            lr = self.lr if lrs is None else lrs[i]
            g = g.double()
            self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * g
            self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * g * g
            if self.storage is not None:
                # u from the moments as stored (the docstring's rule: r is the ratio of the u applied)
                self.m[i], self.v[i] = self.m[i].to(self.storage).double(), self.v[i].to(self.storage).double()
            m_hat = self.m[i] / (1 - self.b1**self.t)
            v_hat = self.v[i] / (1 - self.b2**self.t)
            u = m_hat / (v_hat.sqrt() + self.eps) + self.wd * p
            p_norm, u_norm = p.norm(), u.norm()
            r = p_norm / u_norm if p_norm > 0 and u_norm > 0 else 1.0
            self.params[i] = p - lr * r * u
            if self.storage is not None:
                self.params[i] = self.params[i].to(self.storage).double()


def assert_matches(ours, opt, oracle, dtype, tol=None):
    tol = tol or TOL[dtype]
    for x, p, m, v in zip(ours, oracle.params, oracle.m, oracle.v):
        torch.testing.assert_close(x.detach().double(), p, **tol)
        torch.testing.assert_close(opt.state[x]["exp_avg"].double(), m, **tol)
        torch.testing.assert_close(opt.state[x]["exp_avg_sq"].double(), v, **tol)
        assert float(opt.state[x]["step"]) == oracle.t


def _shapes(impl):
    # A CPU chunk plus one (16385 elements: a tensor whose norm spans two chunks) beside the rest, but for the
    # Triton interpreter, whose chunk (1024) the 1025-element tensor already crosses.
    return SHAPES + ([(16385,)] if impl[1] != "triton" else [])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("weight_decay,l1,maximize", list(itertools.product([0.0, 0.01], [0.0, 0.02], [False, True])))
def test_matches_float64_lamb(lamb_impl, dtype, weight_decay, l1, maximize):
    device = device_of(lamb_impl)
    init = [torch.randn(s, dtype=dtype, device=device) for s in _shapes(lamb_impl)]
    ours = [p.clone().requires_grad_() for p in init]
    # Two groups: the second with its own lr (one op call carries both).
    opt = pyoptim.optim.LAMB([{"params": ours[:2]}, {"params": ours[2:], "lr": 2e-2}], lr=1e-2, betas=(0.9, 0.99),
                             eps=1e-6, weight_decay=weight_decay, l1_weight_decay=l1, maximize=maximize,
                             backend=lamb_impl[1])
    oracle = Float64Lamb(init, lr=None, betas=(0.9, 0.99), eps=1e-6, weight_decay=weight_decay)
    lrs = [1e-2] * 2 + [2e-2] * (len(init) - 2)
    for _ in range(10):
        grads = [torch.randn_like(p) for p in ours]
        for x, g in zip(ours, grads):
            x.grad = g.clone()
        # The step of loss + l1 * sum(|p|): its gradient, with maximize's sign on the loss's part only.
        opt.step()
        oracle.step([(-g.double() if maximize else g.double()) + l1 * torch.sign(p)
                     for g, p in zip(grads, oracle.params)], lrs)
    assert_matches(ours, opt, oracle, dtype)


@pytest.mark.parametrize("dtype, master_weights", [(torch.float32, None), (torch.bfloat16, "fp32")], ids=str)
def test_eps_zero(lamb_impl, dtype, master_weights):
    # eps = 0 is allowed (as torch's Adam allows it): u = m_hat / sqrt(v_hat). Sizes that leave a partial vector
    # at a chunk's end, through the plain loop (fp32) and the precision loop (bf16 params, fp32 masters): the
    # padding lanes of that vector must not enter ||u|| (their u would be 0 / 0), or every trust ratio is wrong.
    device = device_of(lamb_impl)
    init = [torch.randn(s, device=device).to(dtype) for s in _shapes(lamb_impl)]
    ours = [p.clone().requires_grad_() for p in init]
    opt = pyoptim.optim.LAMB(ours, lr=1e-2, eps=0.0, weight_decay=0.01, master_weights=master_weights,
                             backend=lamb_impl[1])
    oracle = Float64Lamb(init, lr=1e-2, betas=(0.9, 0.999), eps=0.0, weight_decay=0.01)
    for _ in range(3):
        grads = [torch.randn(p.shape, device=device).to(dtype) for p in ours]
        for x, g in zip(ours, grads):
            x.grad = g.clone()
        opt.step()
        oracle.step(grads)
    for x, want in zip(ours, oracle.params):
        got = opt.state[x]["master_param"] if master_weights else x.detach()
        torch.testing.assert_close(got.double(), want, **TOL[torch.float32])


def test_trust_ratio_is_one_for_zero_norms(lamb_impl):
    # A zero param (||p|| = 0) with no weight decay moves by lr * u; a zero grad on a zero param gives u = 0.
    device = device_of(lamb_impl)
    p = [torch.zeros(8, device=device, requires_grad=True), torch.zeros(3, device=device, requires_grad=True)]
    opt = pyoptim.optim.LAMB(p, lr=0.1, weight_decay=0.0, backend=lamb_impl[1])
    p[0].grad = torch.full((8,), 2.0, device=device)
    p[1].grad = torch.zeros(3, device=device)
    opt.step()
    # Step 1: m_hat = g, v_hat = g^2, u = g / (|g| + eps) ~ 1.
    torch.testing.assert_close(p[0].detach(), torch.full((8,), -0.1 * 2.0 / (2.0 + 1e-6), device=device))
    assert torch.equal(p[1].detach(), torch.zeros(3, device=device))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision(lamb_impl, dtype):
    # fp16/bf16 storage and fp32 math against the float64 formula with its p, m, v rounded to the storage dtype
    # after each step: they part by the fp32 math's rounding, which can move a stored value by one ulp (then
    # carried on), so the bound is two ulps of the storage dtype.
    device = device_of(lamb_impl)
    init = [torch.randn(s, device=device).to(dtype) for s in [(33,), (4, 5)]]
    ours = [p.clone().requires_grad_() for p in init]
    opt = pyoptim.optim.LAMB(ours, lr=1e-2, weight_decay=0.01, backend=lamb_impl[1])
    oracle = Float64Lamb(init, lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, storage=dtype)
    for _ in range(10):
        grads = [torch.randn_like(p) for p in ours]
        for x, g in zip(ours, grads):
            x.grad = g.clone()
        opt.step()
        oracle.step(grads)
    ulp = torch.finfo(dtype).eps
    for x in ours:
        assert x.dtype == dtype and opt.state[x]["exp_avg"].dtype == dtype
    assert_matches(ours, opt, oracle, dtype, tol=dict(rtol=2 * ulp, atol=1e-3))


def test_grad_scaler_skips_inf_step(lamb_impl):
    device = device_of(lamb_impl)
    torch.manual_seed(1)
    model = torch.nn.Linear(8, 4).to(device)
    opt = pyoptim.optim.LAMB(model.parameters(), lr=1e-2, backend=lamb_impl[1])
    oracle = Float64Lamb(list(model.parameters()), lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
    scaler = torch.amp.GradScaler(device.type, init_scale=1024.0)
    for it in range(5):
        x = torch.randn(16, 8, device=device)
        opt.zero_grad()
        scaler.scale(model(x).square().mean()).backward()
        if it == 2:
            model.weight.grad[0, 0] = float("inf")  # this step must change nothing, steps included
            before = [p.detach().clone() for p in model.parameters()]
            state = copy.deepcopy(opt.state_dict()["state"])
        unscaled = [p.grad.double() / scaler.get_scale() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        if it == 2:
            for p, q in zip(model.parameters(), before):
                torch.testing.assert_close(p.detach(), q, rtol=0, atol=0)
            for k, st in opt.state_dict()["state"].items():
                for name, v in st.items():
                    torch.testing.assert_close(v, state[k][name], rtol=0, atol=0)
        else:
            oracle.step(unscaled)
    assert_matches(list(model.parameters()), opt, oracle, torch.float32)


def test_fused_clip_is_global_before_the_moments(lamb_impl):
    device = device_of(lamb_impl)
    init = [torch.randn(s, device=device) for s in [(5,), (3, 4)]]
    ours = [p.clone().requires_grad_() for p in init]
    opt = pyoptim.optim.LAMB(ours, lr=1e-2, max_grad_norm=0.5, backend=lamb_impl[1])
    oracle = Float64Lamb(init, lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
    for _ in range(10):
        grads = [torch.randn_like(p) * 3 for p in ours]
        for x, g in zip(ours, grads):
            x.grad = g.clone()
        opt.step()
        holders = [torch.zeros_like(g, dtype=torch.float64, requires_grad=True) for g in grads]
        for h, g in zip(holders, grads):
            h.grad = g.double()
        norm = torch.nn.utils.clip_grad_norm_(holders, 0.5)
        clipped = [h.grad for h in holders]
        torch.testing.assert_close(opt.grad_norm, norm.float(), **TOL[torch.float32])
        oracle.step(clipped)
    assert_matches(ours, opt, oracle, torch.float32)


@pytest.mark.parametrize("direction", ["pyoptim_to_torch", "torch_to_pyoptim"])
def test_state_dict_round_trip(lamb_impl, direction):
    # torch.optim has no LAMB: the hand-over is between this backend and the reference one (state keys and
    # types are torch.optim.Adam's, checked below, so they load there too).
    device = device_of(lamb_impl)
    init = [torch.randn(5, device=device), torch.randn(3, 4, device=device)]
    a, b, first, second = hand_over_state_dict(
        direction, lambda ps: pyoptim.optim.LAMB(ps, lr=1e-2, backend=lamb_impl[1]),
        lambda ps: pyoptim.optim.LAMB(ps, lr=1e-2, backend="reference"), init)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, **TOL[torch.float32])
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(first.state[p][k], second.state[q][k], **TOL[torch.float32])
        assert float(first.state[p]["step"]) == float(second.state[q]["step"]) == 6


def test_state_moves_to_and_from_torch_adam():
    p = torch.randn(3, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    ours, adam = pyoptim.optim.LAMB([p]), torch.optim.Adam([q])
    p.grad, q.grad = torch.ones(3), torch.ones(3)
    ours.step()
    adam.step()
    sa, sb = ours.state_dict()["state"][0], adam.state_dict()["state"][0]
    assert set(sa) == set(sb)
    for k, v in sb.items():
        assert sa[k].dtype == v.dtype and sa[k].shape == v.shape
    ours.load_state_dict(adam.state_dict())  # Adam's group keys lack l1_weight_decay: it gets its default
    assert ours.param_groups[0]["l1_weight_decay"] == 0.0
    p.grad = torch.ones(3)
    ours.step()
    assert float(ours.state[p]["step"]) == 2


def test_lr_scheduler(lamb_impl):
    device = device_of(lamb_impl)
    init = [torch.randn(6, device=device)]
    ours = [init[0].clone().requires_grad_()]
    opt = pyoptim.optim.LAMB(ours, lr=0.1, backend=lamb_impl[1])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    oracle = Float64Lamb(init, lr=0.1, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
    for _ in range(6):
        g = torch.randn(6, device=device)
        ours[0].grad = g.clone()
        opt.step()
        oracle.step([g])
        sched.step()
        oracle.lr = opt.param_groups[0]["lr"]
    assert opt.param_groups[0]["lr"] == 0.1 * 0.5**3
    assert_matches(ours, opt, oracle, torch.float32)


@pytest.mark.parametrize("kwargs,message", [
    (dict(lr=-1.0), "Invalid learning rate: -1.0"),
    (dict(eps=-1.0), "Invalid epsilon value: -1.0"),
    (dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0: 1.0"),
    (dict(betas=(0.9, -0.1)), "Invalid beta parameter at index 1: -0.1"),
    (dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
    (dict(l1_weight_decay=-0.1), "Invalid l1_weight_decay value: -0.1"),
])
def test_bad_hyperparameters_raise(kwargs, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)") + "$"):
        pyoptim.optim.LAMB([torch.zeros(2, requires_grad=True)], **kwargs)


def test_differentiable_raises():
    with pytest.raises(RuntimeError, match="does not support differentiable=True"):
        pyoptim.optim.LAMB([torch.zeros(2, requires_grad=True)], differentiable=True)


def test_failed_step_changes_nothing_across_calls(lamb_impl):
    # Two op calls (fp32 and fp64 params); the second's bad argument stops the first from writing.
    device = device_of(lamb_impl)
    p32 = [torch.randn(4, device=device, requires_grad=True)]
    p64 = [torch.randn(4, dtype=torch.float64, device=device, requires_grad=True)]
    opt = pyoptim.optim.LAMB([{"params": p32}, {"params": p64}], backend=lamb_impl[1])
    for p in p32 + p64:
        p.grad = torch.randn_like(p)
    opt.param_groups[1]["betas"] = (1.5, 0.999)  # set behind the constructor's checks
    before = [p.detach().clone() for p in p32 + p64]
    with pytest.raises(RuntimeError, match="Invalid beta parameter at index 0"):
        opt.step()
    for p, q in zip(p32 + p64, before):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=0)
    assert len(opt.state) == 0


def test_found_inf_skips_everything(lamb_impl):
    device = device_of(lamb_impl)
    args, kwargs = _op_args()
    args = tuple([t.to(device) for t in lst] for lst in args)
    before = copy.deepcopy(args)
    pyoptim.functional.lamb_step_(*args, **kwargs, found_inf=torch.tensor(1.0, device=device), backend=lamb_impl[1])
    for xs, ys in zip(args, before):
        for x, y in zip(xs, ys):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def _op_args(dtype=torch.float32):
    shapes = [(5,), (2, 3), ()]
    t = lambda: [torch.randn(s, dtype=dtype) for s in shapes]  # noqa: E731
    vs = [x.abs() for x in t()]
    return (t(), t(), t(), vs, [torch.tensor(2.0) for _ in shapes]), dict(
        lr=[1e-3, 2e-3], beta1=[0.9, 0.8], beta2=[0.999, 0.99], weight_decay=[0.0, 0.1], eps=[1e-6, 1e-4],
        l1_weight_decay=[0.01, 0.0], group_sizes=[2, 1], maximize=False)


@pytest.mark.skipif(not _backends.EXTENSION_LOADED, reason="the extension is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(dtype):
    args, kwargs = _op_args(dtype)
    torch.library.opcheck(torch.ops.pyoptim.lamb_step_, args, kwargs)
    args, kwargs = _op_args(dtype)
    kwargs.update(grad_scale=torch.tensor(4.0), found_inf=torch.tensor(0.0), grad_norm=torch.tensor(3.0),
                  max_grad_norm=1.0, lr_tensor=torch.tensor([1e-3, 1e-2], dtype=torch.float64))
    torch.library.opcheck(torch.ops.pyoptim.lamb_step_, args, kwargs)


@pytest.mark.skipif(not _backends.EXTENSION_LOADED, reason="the extension is not built")
def test_torch_compile_fullgraph():
    args, kwargs = _op_args()
    expected = copy.deepcopy(args)

    def step(p, g, m, v, s):
        torch.ops.pyoptim.lamb_step_(p, g, m, v, s, **kwargs)

    torch.compile(step, fullgraph=True, backend="aot_eager")(*args)
    step(*expected)
    for xs, ys in zip(args, expected):
        for x, y in zip(xs, ys):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_every_backend_agrees_with_reference():
    from tests.conftest import impls
    for device_type, backend in [i for i in impls("lamb_step_") if i[1] != "reference"]:
        args, kwargs = _op_args()
        args = tuple([t.to(device_type) for t in lst] for lst in args)
        kwargs["grad_scale"] = torch.tensor(8.0, device=device_type)
        ref = copy.deepcopy(args)
        pyoptim.functional.lamb_step_(*args, **kwargs, backend=backend)
        pyoptim.reference.lamb_step_ref(*ref, **kwargs)
        for xs, ys in zip(args, ref):
            for x, y in zip(xs, ys):
                torch.testing.assert_close(x, y, **TOL[torch.float32])


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_capture(backend):
    # capturable: a Tensor lr and the steps read on the device, one captured step replayed against eager steps.
    if backend not in _backends.available("lamb_step_", "cuda"):
        pytest.skip(f"{backend} is not built here")
    device = torch.device("cuda")
    init = [torch.randn(s, device=device) for s in [(1000,), (65537,), (3, 7)]]
    a = [p.clone().requires_grad_() for p in init]
    b = [p.clone().requires_grad_() for p in init]
    oa = pyoptim.optim.LAMB(a, lr=torch.tensor(1e-2, device=device), capturable=True, backend=backend)
    ob = pyoptim.optim.LAMB(b, lr=1e-2, backend="reference")
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
        assert float(oa.state[x]["step"]) == float(ob.state[y]["step"]) == 6


# -- LAMB's two passes as ops (note [LAMB's two passes]) ------------------------------


def test_moments_then_apply_is_the_step(lamb_impl):
    """lamb_moments_ then lamb_apply_ over its norms is lamb_step_ bit for bit, on every backend; the norms are
    each tensor's ||p||^2 (p before the step) and ||u||^2, against the reference's (the grads' clip, grad_scale
    and l1 included)."""
    device = device_of(lamb_impl)
    args, kwargs = _op_args()
    kwargs.update(grad_scale=torch.tensor(2.0, device=device), grad_norm=torch.tensor(3.0, device=device),
                  max_grad_norm=1.0)
    args = tuple([t.to(device) for t in lst] for lst in args)
    whole, split, ref = copy.deepcopy(args), copy.deepcopy(args), copy.deepcopy(args)
    pyoptim.functional.lamb_step_(*whole, **kwargs, backend=lamb_impl[1])
    norms = pyoptim.functional.lamb_moments_(*split, **kwargs, backend=lamb_impl[1])
    assert norms.shape == (2, 3) and norms.dtype == torch.float64 and norms.device == device
    ref_norms = pyoptim.reference.lamb_moments_ref(*ref, **kwargs)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-6, atol=0)
    torch.testing.assert_close(norms[0], torch.stack([p.double().square().sum() for p in args[0]]), rtol=1e-6,
                               atol=0)
    pyoptim.functional.lamb_apply_(*split, norms, **kwargs, backend=lamb_impl[1])
    for xs, ys in zip(whole, split):
        for x, y in zip(xs, ys):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_apply_takes_the_norms_given(lamb_impl):
    """lamb_apply_ moves p by the trust ratio of the norms it is given (here 4x the local ones: r doubles), and
    reads the steps as lamb_moments_ left them; found_inf skips both passes (zeros back)."""
    device = device_of(lamb_impl)
    args, kwargs = _op_args()
    args = tuple([t.to(device) for t in lst] for lst in args)
    a, b = copy.deepcopy(args), copy.deepcopy(args)
    norms = pyoptim.functional.lamb_moments_(*a, **kwargs, backend=lamb_impl[1])
    pyoptim.functional.lamb_moments_(*b, **kwargs, backend=lamb_impl[1])
    scaled = norms * torch.tensor([[4.0], [1.0]], dtype=torch.float64, device=device)
    before = [p.clone() for p in a[0]]
    pyoptim.functional.lamb_apply_(*a, norms, **kwargs, backend=lamb_impl[1])
    pyoptim.functional.lamb_apply_(*b, scaled, **kwargs, backend=lamb_impl[1])
    for p0, pa, pb in zip(before, a[0], b[0]):
        # twice the move, up to the rounding of each new p (an ulp of p: |p| < 4 here)
        torch.testing.assert_close(pb - p0, 2 * (pa - p0), rtol=1e-5, atol=5e-7)
    assert all(float(s) == 3.0 for s in a[4])  # advanced once, by the moments pass
    c = copy.deepcopy(args)
    snap = copy.deepcopy(c)
    inf = torch.tensor(1.0, device=device)
    out = pyoptim.functional.lamb_moments_(*c, **kwargs, found_inf=inf, backend=lamb_impl[1])
    torch.testing.assert_close(out, torch.zeros_like(out), rtol=0, atol=0)
    pyoptim.functional.lamb_apply_(*c, norms, **kwargs, found_inf=inf, backend=lamb_impl[1])
    for xs, ys in zip(c, snap):
        for x, y in zip(xs, ys):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_apply_refuses_bad_norms(lamb_impl):
    device = device_of(lamb_impl)
    args, kwargs = _op_args()
    args = tuple([t.to(device) for t in lst] for lst in args)
    for bad in (torch.zeros(2, 2, dtype=torch.float64, device=device), torch.zeros(2, 3, device=device),
                torch.zeros(3, dtype=torch.float64, device=device)):
        with pytest.raises(RuntimeError, match=r"lamb_apply_: norms must be a float64 tensor of shape \[2, 3\]"):
            pyoptim.functional.lamb_apply_(*args, bad, **kwargs, backend=lamb_impl[1])


@pytest.mark.skipif(not _backends.EXTENSION_LOADED, reason="the extension is not built")
def test_opcheck_two_passes():
    args, kwargs = _op_args()
    torch.library.opcheck(torch.ops.pyoptim.lamb_moments_, args, kwargs)
    args, kwargs = _op_args()
    norms = torch.ops.pyoptim.lamb_moments_(*copy.deepcopy(args), **kwargs)
    torch.library.opcheck(torch.ops.pyoptim.lamb_apply_, args[:5] + (norms,), kwargs)
