"""Adagrad: every backend against torch.optim.Adagrad (foreach=False) and the edge cases."""

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


def _groups(ps, **first):
    # Two groups of other hyperparameters, so one call carries both.
    return [dict(params=ps[:3], **first), dict(params=ps[3:], lr=3e-2, lr_decay=0.05, eps=1e-6, weight_decay=0.05)]


def run_both(impl, dtype, steps=10, l1=0.0, shapes=SHAPES, **kw):
    """Step pyoptim's Adagrad and torch's (foreach=False) on copies of the same params, the first group with
    l1_weight_decay=l1 on ours; torch gets the grads that make its step ours: plus l1 * sign(p) (the gradient of
    l1 * sum(|p|)), minus it under maximize (torch negates what it is fed; ours adds the pull after maximize's
    sign, so L1 pulls towards 0 either way)."""
    device = device_of(impl)
    init = [torch.randn(s, dtype=dtype, device=device) for s in shapes]
    if init[2].numel() > 3:
        init[2].view(-1)[3] = 0.0  # sign(0) = 0: no pull on a zero
    a = [p.clone().requires_grad_() for p in init]
    b = [p.clone().requires_grad_() for p in init]
    oa = pyoptim.optim.Adagrad(_groups(a, l1_weight_decay=l1), backend=impl[1], **kw)
    ob = torch.optim.Adagrad(_groups(b), foreach=False, **kw)
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


def assert_same(a, b, oa, ob, dtype, tol=None):
    tol = tol or TOL[dtype]
    for x, y in zip(a, b):
        torch.testing.assert_close(x.detach(), y.detach(), **tol)
        sa, sb = oa.state[x], ob.state[y]
        assert set(sa) == set(sb) == {"step", "sum"}
        torch.testing.assert_close(sa["sum"], sb["sum"], **tol)
        assert float(sa["step"]) == float(sb["step"])


# -- against torch, every option ---------------------------------------------


@pytest.mark.parametrize("lr_decay,weight_decay,initial_accumulator_value,maximize",
                         list(itertools.product([0.0, 0.1], [0.0, 0.1], [0.0, 0.5], [False, True])))
def test_matches_torch(adagrad_impl, lr_decay, weight_decay, initial_accumulator_value, maximize):
    a, b, oa, ob = run_both(adagrad_impl, torch.float32, lr=1e-2, lr_decay=lr_decay, weight_decay=weight_decay,
                            initial_accumulator_value=initial_accumulator_value, maximize=maximize)
    assert_same(a, b, oa, ob, torch.float32)


@pytest.mark.parametrize("kw", [dict(), dict(lr_decay=0.1, weight_decay=0.1, initial_accumulator_value=0.5,
                                              maximize=True, eps=1e-3)], ids=["defaults", "all"])
def test_matches_torch_float64(adagrad_impl, kw):
    a, b, oa, ob = run_both(adagrad_impl, torch.float64, **kw)
    assert_same(a, b, oa, ob, torch.float64)


@pytest.mark.parametrize("weight_decay,maximize,lr_decay", [(0.0, False, 0.0), (0.1, False, 0.1), (0.1, True, 0.0)])
def test_l1_equals_torch_on_the_l1_regularized_loss(adagrad_impl, weight_decay, maximize, lr_decay):
    a, b, oa, ob = run_both(adagrad_impl, torch.float32, l1=0.05, weight_decay=weight_decay, maximize=maximize,
                            lr_decay=lr_decay)
    assert_same(a, b, oa, ob, torch.float32)
    assert oa.param_groups[0]["l1_weight_decay"] == 0.05 and oa.param_groups[1]["l1_weight_decay"] == 0.0


@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.float64], ids=str)
def test_tensor_lr_and_boundary_shapes(adagrad_impl, lr_dtype):
    # An empty tensor (its step still advances), a Triton block plus one (1025), and a CPU chunk plus one (16385).
    # A float32 lr tensor: torch computes clr in float32 (lr / (1 + (step - 1) * lr_decay)), ours in float64 and
    # rounds once, an ulp apart at most.
    shapes = [(0,), (3,), (1025,)] + ([(16385,)] if adagrad_impl[1] != "triton" else [])
    device = device_of(adagrad_impl)
    init = [torch.randn(s, device=device) for s in shapes]
    a = [p.clone().requires_grad_() for p in init]
    b = [p.clone().requires_grad_() for p in init]
    kw = dict(lr_decay=0.1, weight_decay=0.1)
    oa = pyoptim.optim.Adagrad(a, lr=torch.tensor(3e-2, dtype=lr_dtype), backend=adagrad_impl[1], **kw)
    ob = torch.optim.Adagrad(b, lr=torch.tensor(3e-2, dtype=lr_dtype), foreach=False, **kw)
    step_both(a, b, oa, ob)
    assert_same(a, b, oa, ob, torch.float32)


def test_signature_mirrors_torch():
    # torch's parameters, defaults and kinds (foreach positional, maximize, differentiable and fused keyword-only),
    # then ours, keyword-only.
    assert_signature_extends(pyoptim.optim.Adagrad, torch.optim.Adagrad)


def test_state_at_construction_matches_torch():
    # torch makes `step` and `sum` (full of initial_accumulator_value, complex for a complex param) at
    # construction, for the groups given then, from the constructor's value whatever a group's own; a group
    # added later gets its state at its first step.
    ps = [torch.randn(3, requires_grad=True), torch.randn(2, 2, dtype=torch.complex64, requires_grad=True),
          torch.randn(4, requires_grad=True)]

    def groups(xs):
        return [dict(params=xs[:2]), dict(params=xs[2:3], initial_accumulator_value=2.0)]

    a = [p.detach().clone().requires_grad_() for p in ps]
    b = [p.detach().clone().requires_grad_() for p in ps]
    oa = pyoptim.optim.Adagrad(groups(a), initial_accumulator_value=0.3)
    ob = torch.optim.Adagrad(groups(b), initial_accumulator_value=0.3)
    sa, sb = oa.state_dict(), ob.state_dict()
    assert sa["state"].keys() == sb["state"].keys() == {0, 1, 2}
    for k, st in sb["state"].items():
        assert list(sa["state"][k]) == list(st)
        for name, v in st.items():
            assert sa["state"][k][name].dtype == v.dtype and sa["state"][k][name].shape == v.shape
            torch.testing.assert_close(sa["state"][k][name], v, rtol=0, atol=0)
    assert set(sb["param_groups"][0]) <= set(sa["param_groups"][0])
    late_a = torch.randn(5, requires_grad=True)
    late_b = late_a.detach().clone().requires_grad_()
    oa.add_param_group(dict(params=[late_a], initial_accumulator_value=1.0))
    ob.add_param_group(dict(params=[late_b], initial_accumulator_value=1.0))
    assert late_a not in oa.state and late_b not in ob.state
    for x, y in zip(a + [late_a], b + [late_b]):
        g = torch.randn_like(x)
        x.grad, y.grad = g.clone(), g.clone()
    oa.step()
    ob.step()
    torch.testing.assert_close(oa.state[late_a]["sum"], ob.state[late_b]["sum"], **TOL[torch.float32])
    for x, y in zip(a + [late_a], b + [late_b]):
        torch.testing.assert_close(x.detach(), y.detach(), **TOL[torch.float32])


def test_complex_params_match_torch():
    p = torch.randn(6, dtype=torch.complex64)
    a, b = [p.clone().requires_grad_()], [p.clone().requires_grad_()]
    kw = dict(lr=1e-2, weight_decay=0.1, initial_accumulator_value=0.2)
    oa, ob = pyoptim.optim.Adagrad(a, **kw), torch.optim.Adagrad(b, foreach=False, **kw)
    step_both(a, b, oa, ob, steps=5)
    torch.testing.assert_close(a[0], b[0], **TOL[torch.float32])
    torch.testing.assert_close(oa.state[a[0]]["sum"], ob.state[b[0]]["sum"], **TOL[torch.float32])


def test_step_plan_records_and_replays():
    # note [step plan]: the state made at construction is not new at the first step, so that step records the
    # plan and the later ones replay it (the cpu backend).
    if "cpu" not in _backends.available("adagrad_step_", "cpu"):
        pytest.skip("the extension is not built")
    a, b, oa, ob = run_both(("cpu", "cpu"), torch.float32, steps=4, lr_decay=0.1)
    assert oa.__dict__.get("_plan") is not None
    assert_same(a, b, oa, ob, torch.float32)


def test_flat_storage_equals_the_ordinary_path(adagrad_impl):
    device = device_of(adagrad_impl)
    init = [torch.randn(s, device=device) for s in [(5,), (3, 4), (7,)]]
    a = [p.clone().requires_grad_() for p in init]
    b = [p.clone().requires_grad_() for p in init]
    kw = dict(lr=1e-2, lr_decay=0.1, weight_decay=0.1, initial_accumulator_value=0.1, backend=adagrad_impl[1])
    oa, ob = pyoptim.optim.Adagrad(a, flat=True, **kw), pyoptim.optim.Adagrad(b, **kw)
    step_both(a, b, oa, ob, steps=5)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
        torch.testing.assert_close(oa.state[x]["sum"], ob.state[y]["sum"], rtol=0, atol=0)
        assert float(oa.state[x]["step"]) == float(ob.state[y]["step"]) == 5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_at_least_as_accurate_as_torch(adagrad_impl, dtype):
    """Error against a float64 run, for params and sums: ours (fp32 math, one rounding per stored value) is no
    worse than torch's for-loop (which rounds after every op), in the params' dtype. A param's error is mostly
    its own rounding to that dtype, once a step in both (torch's addcdiv_ rounds once too): there ours may sit a
    hair either side of torch's (fp16: 0.27% above)."""
    kw = dict(lr=5e-2, lr_decay=0.01, weight_decay=0.1, initial_accumulator_value=0.1)
    errors = low_precision_errors(lambda ps: pyoptim.optim.Adagrad(ps, backend=adagrad_impl[1], **kw),
                                  lambda ps: torch.optim.Adagrad(ps, foreach=False, **kw), dtype,
                                  device_of(adagrad_impl), ["sum"])
    slack = {None: 1.01, "sum": 1.0}
    for key, (e_ours, e_torch) in errors.items():
        assert e_ours <= e_torch * slack[key], (key or "param", e_ours, e_torch)


# -- the API: GradScaler, the clip, state_dict, schedulers ---------------------


def test_grad_scaler_skips_inf_step(adagrad_impl):
    kw = dict(lr=1e-2, lr_decay=0.1)
    (model_a, opt_a, scaler_a), (model_b, opt_b, scaler_b) = grad_scaler_against(
        lambda ps: pyoptim.optim.Adagrad(ps, backend=adagrad_impl[1], **kw),
        lambda ps: torch.optim.Adagrad(ps, foreach=False, **kw), device_of(adagrad_impl))
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(p, q, **TOL[torch.float32])
        torch.testing.assert_close(opt_a.state[p]["sum"], opt_b.state[q]["sum"], **TOL[torch.float32])
        assert float(opt_a.state[p]["step"]) == float(opt_b.state[q]["step"]) == 4
    assert scaler_a.get_scale() == scaler_b.get_scale()


def test_fused_clip_equals_clip_then_step(adagrad_impl):
    kw = dict(lr=1e-2)
    a, b, oa, ob = clipped_steps_against(
        lambda ps: pyoptim.optim.Adagrad(ps, max_grad_norm=0.5, backend=adagrad_impl[1], **kw),
        lambda ps: torch.optim.Adagrad(ps, foreach=False, **kw), device_of(adagrad_impl), 0.5)
    assert_same(a, b, oa, ob, torch.float32)


@pytest.mark.parametrize("direction", ["pyoptim_to_torch", "torch_to_pyoptim"])
def test_state_dict_round_trip(adagrad_impl, direction):
    device = device_of(adagrad_impl)
    init = [torch.randn(5, device=device), torch.randn(3, 4, device=device)]
    kw = dict(lr=1e-2, lr_decay=0.1, weight_decay=0.05, initial_accumulator_value=0.1)
    a, b, first, second = hand_over_state_dict(
        direction, lambda ps: pyoptim.optim.Adagrad(ps, backend=adagrad_impl[1], **kw),
        lambda ps: torch.optim.Adagrad(ps, foreach=False, **kw), init)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, **TOL[torch.float32])
        torch.testing.assert_close(first.state[p]["sum"], second.state[q]["sum"], **TOL[torch.float32])
        assert float(first.state[p]["step"]) == float(second.state[q]["step"]) == 6
    ours = first if direction == "pyoptim_to_torch" else second
    assert all(g["l1_weight_decay"] == 0.0 and g["maximize"] is False for g in ours.param_groups)


def test_lr_scheduler(adagrad_impl):
    kw = dict(lr=0.1, lr_decay=0.01)
    a, b, oa, ob = lr_scheduler_against(lambda ps: pyoptim.optim.Adagrad(ps, backend=adagrad_impl[1], **kw),
                                        lambda ps: torch.optim.Adagrad(ps, foreach=False, **kw),
                                        device_of(adagrad_impl))
    assert oa.param_groups[0]["lr"] == 0.1 * 0.5**3
    torch.testing.assert_close(a[0], b[0], **TOL[torch.float32])


# -- PyTorch's own optimizer inputs (optim_db) ---------------------------------------


@pytest.mark.parametrize("kwargs", torch_optim_db_inputs("Adagrad"))
def test_torch_optim_db_inputs(adagrad_impl, kwargs):
    # Each of torch's own test configurations of Adagrad, ours built with the same keywords, against torch's for-loop.
    a, b, oa, ob = same_keywords_against(pyoptim.optim.Adagrad, torch.optim.Adagrad, kwargs, device_of(adagrad_impl),
                                         adagrad_impl[1])
    assert_same(a, b, oa, ob, torch.float32)


def test_torch_optim_db_error_inputs():
    # torch's own bad-input cases raise here what they raise in torch.
    assert_torch_optim_db_errors("Adagrad", pyoptim.optim.Adagrad)


# -- bad input, and exception safety -------------------------------------------


@pytest.mark.parametrize("kwargs,message", [
    (dict(lr=-1.0), "Invalid learning rate: -1.0"),
    (dict(lr_decay=-0.5), "Invalid lr_decay value: -0.5"),
    (dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
    (dict(initial_accumulator_value=-1.0), "Invalid initial_accumulator_value value: -1.0"),
    (dict(eps=-1.0), "Invalid epsilon value: -1.0"),
    (dict(lr=torch.tensor([1e-2, 1e-2])), "Tensor lr must be 1-element"),
])
def test_bad_hyperparameters_raise_torchs_errors(kwargs, message):
    assert_raises_as_torch(pyoptim.optim.Adagrad, torch.optim.Adagrad, kwargs, message)


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(l1_weight_decay=-0.1), ValueError, "^Invalid l1_weight_decay value: -0.1$"),
    (dict(max_grad_norm=0.0), ValueError, "^Invalid max_grad_norm value: 0.0$"),
    (dict(differentiable=True), RuntimeError, r"does not support differentiable=True \(use torch.optim.Adagrad\)"),
    (dict(fused=True, foreach=True), RuntimeError, "`fused` and `foreach` cannot be `True` together."),
    (dict(backend="opencl"), ValueError, "unknown backend"),
])
def test_bad_extra_arguments_raise(kwargs, error, message):
    with pytest.raises(error, match=message):
        pyoptim.optim.Adagrad([torch.zeros(2, requires_grad=True)], **kwargs)


def test_foreach_and_fused_are_accepted():
    for kw in (dict(foreach=True), dict(foreach=False), dict(fused=True), dict(fused=False)):
        p = torch.randn(3, requires_grad=True)
        opt = pyoptim.optim.Adagrad([p], **kw)
        p.grad = torch.ones(3)
        opt.step()
        assert float(opt.state[p]["step"]) == 1


def _embedding_steps(make_opt, torch_opt, steps=5):
    """An nn.Embedding(sparse=True) and a dense Linear trained by `make_opt` and by torch's `torch_opt` on the
    same batches: (ours, theirs) models after `steps` steps."""
    torch.manual_seed(0)
    models = []
    for factory in (make_opt, torch_opt):
        torch.manual_seed(0)
        emb, lin = torch.nn.Embedding(11, 4, sparse=True), torch.nn.Linear(4, 1)
        models.append((emb, lin, factory(list(emb.parameters()) + list(lin.parameters()))))
    for _ in range(steps):
        idx = torch.randint(0, 11, (6,))
        for emb, lin, opt in models:
            opt.zero_grad()
            loss = lin(emb(idx)).square().sum()
            loss.backward()
            opt.step()
    return models


def test_sparse_grads_step_as_torchs(adagrad_impl):
    """note [sparse grads]: an nn.Embedding(sparse=True) beside dense params steps as torch.optim.Adagrad steps it
    (torch's own update for the sparse ones, the fused call for the rest), state interchangeable."""
    kw = dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1)
    ours, theirs = _embedding_steps(lambda ps: pyoptim.optim.Adagrad(ps, backend=adagrad_impl[1], **kw),
                                    lambda ps: torch.optim.Adagrad(ps, foreach=False, **kw))
    for a, b in zip(ours[0].parameters(), theirs[0].parameters()):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
    for a, b in zip(ours[1].parameters(), theirs[1].parameters()):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
    for a, b in zip(ours[0].parameters(), theirs[0].parameters()):
        torch.testing.assert_close(ours[2].state[a]["sum"], theirs[2].state[b]["sum"], **TOL[torch.float32])
        assert float(ours[2].state[a]["step"]) == float(theirs[2].state[b]["step"]) == 5


def test_sparse_grad_with_weight_decay_raises_torchs_error_before_any_write(adagrad_impl):
    device = device_of(adagrad_impl)
    dense = torch.randn(3, device=device, requires_grad=True)
    p = torch.randn(4, device=device, requires_grad=True)
    opt = pyoptim.optim.Adagrad([dense, p], weight_decay=0.1, backend=adagrad_impl[1])
    dense.grad = torch.ones(3, device=device)
    p.grad = torch.sparse_coo_tensor([[0]], [1.0], (4,), device=device)
    before = dense.detach().clone(), p.detach().clone()
    with pytest.raises(RuntimeError, match="weight_decay option is not compatible with sparse gradients"):
        opt.step()
    assert torch.equal(dense.detach(), before[0]) and torch.equal(p.detach(), before[1])
    assert float(opt.state[p]["step"]) == 0 and float(opt.state[dense]["step"]) == 0


def test_sparse_grad_with_max_grad_norm_raises_before_any_write():
    p = torch.randn(4, requires_grad=True)
    opt = pyoptim.optim.Adagrad([p], max_grad_norm=1.0)
    p.grad = torch.sparse_coo_tensor([[0]], [1.0], (4,))
    with pytest.raises(RuntimeError, match="max_grad_norm does not support sparse gradients"):
        opt.step()
    assert float(opt.state[p]["step"]) == 0


@pytest.mark.parametrize("corrupt", ["state_shape", "group_lr_decay", "group_l1"])
def test_failed_step_changes_nothing(adagrad_impl, corrupt):
    # Two calls (fp32 and fp64 groups); a bad argument of the second must stop the first from writing.
    device = device_of(adagrad_impl)
    p32 = [torch.randn(4, device=device, requires_grad=True), torch.randn(5, device=device, requires_grad=True)]
    p64 = [torch.randn(3, dtype=torch.float64, device=device, requires_grad=True)]
    opt = pyoptim.optim.Adagrad([{"params": p32}, {"params": p64}], backend=adagrad_impl[1])
    for p in p32 + p64:
        p.grad = torch.randn_like(p)
    opt.step()
    if corrupt == "state_shape":
        opt.state[p32[1]]["sum"] = torch.zeros(6, device=device)
        match = r"state_sums\[1\] has shape"
    elif corrupt == "group_lr_decay":
        opt.param_groups[1]["lr_decay"] = -1.0  # set behind the constructor's checks
        match = "Invalid lr_decay value: -1"
    else:
        opt.param_groups[1]["l1_weight_decay"] = -1.0
        match = "Invalid l1_weight_decay value: -1"
    snap = snapshot(p32 + p64, opt)
    with pytest.raises(RuntimeError, match=match):
        opt.step()
    assert_unchanged(p32 + p64, opt, snap)


def test_op_errors_name_the_index():
    p = [torch.zeros(3), torch.zeros(3)]
    for backend in _backends.available("adagrad_step_", "cpu"):
        with pytest.raises(RuntimeError, match=r"adagrad_step_: grads\[1\] has dtype"):
            pyoptim.functional.adagrad_step_(
                p, [torch.zeros(3), torch.zeros(3, dtype=torch.float64)], [torch.zeros(3)] * 2,
                [torch.zeros(()), torch.zeros(())], lr=[1e-2], lr_decay=[0.0], weight_decay=[0.0], eps=[1e-10],
                backend=backend)
        with pytest.raises(RuntimeError, match=r"adagrad_step_: state_steps\[0\] must be a float32 tensor"):
            pyoptim.functional.adagrad_step_(
                p, [torch.zeros(3)] * 2, [torch.zeros(3)] * 2, [torch.zeros((), dtype=torch.int64), torch.zeros(())],
                lr=[1e-2], lr_decay=[0.0], weight_decay=[0.0], eps=[1e-10], backend=backend)


def test_empty_list_is_a_no_op():
    pyoptim.functional.adagrad_step_([], [], [], [], lr=[1e-2], lr_decay=[0.0], weight_decay=[0.0], eps=[1e-10])
    p = torch.zeros(2, requires_grad=True)
    opt = pyoptim.optim.Adagrad([p])
    opt.step()  # no grads at all
    assert float(opt.state[p]["step"]) == 0


def test_found_inf_skips_everything(adagrad_impl):
    device = device_of(adagrad_impl)
    args, kwargs = _op_args()
    args = tuple([t.to(device) for t in lst] for lst in args)
    before = copy.deepcopy(args)
    kwargs["found_inf"] = torch.tensor(1.0, device=device)
    pyoptim.functional.adagrad_step_(*args, **kwargs, backend=adagrad_impl[1])
    for xs, ys in zip(args, before):
        for x, y in zip(xs, ys):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


# -- the op: opcheck, every backend against the reference, torch.compile ------------


def _op_args(dtype=torch.float32):
    shapes = [(5,), (2, 3), ()]
    t = lambda: [torch.randn(s, dtype=dtype) for s in shapes]  # noqa: E731
    return (t(), t(), [x.abs() for x in t()], [torch.tensor(2.0) for _ in shapes]), dict(
        lr=[1e-2, 2e-2], lr_decay=[0.0, 0.1], weight_decay=[0.0, 0.1], eps=[1e-10, 1e-6],
        l1_weight_decay=[0.01, 0.0], group_sizes=[2, 1], maximize=False)


def test_every_backend_agrees_with_reference(adagrad_impl):
    # The op's contract (per-group lists, grad_scale, the clip, lr_tensor) through each backend against
    # reference.adagrad_step_ref directly.
    device = device_of(adagrad_impl)
    args, kwargs = _op_args()
    args = tuple([t.to(device) for t in lst] for lst in args)
    kwargs.update(grad_scale=torch.tensor(8.0, device=device), grad_norm=torch.tensor(40.0, device=device),
                  max_grad_norm=1.0, lr_tensor=torch.tensor([3e-2, 1e-2], dtype=torch.float64, device=device))
    ref = copy.deepcopy(args)
    pyoptim.functional.adagrad_step_(*args, **kwargs, backend=adagrad_impl[1])
    pyoptim.reference.adagrad_step_ref(*ref, **kwargs)
    for xs, ys in zip(args, ref):
        for x, y in zip(xs, ys):
            torch.testing.assert_close(x, y, **TOL[torch.float32])


@pytest.mark.skipif(not _backends.EXTENSION_LOADED, reason="the extension is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(dtype):
    args, kwargs = _op_args(dtype)
    torch.library.opcheck(torch.ops.pyoptim.adagrad_step_, args, kwargs)
    args, kwargs = _op_args(dtype)
    kwargs.update(grad_scale=torch.tensor(4.0), found_inf=torch.tensor(0.0), grad_norm=torch.tensor(3.0),
                  max_grad_norm=1.0, lr_tensor=torch.tensor([1e-3, 1e-2], dtype=torch.float64))
    torch.library.opcheck(torch.ops.pyoptim.adagrad_step_, args, kwargs)


@pytest.mark.skipif(not _backends.EXTENSION_LOADED, reason="the extension is not built")
def test_torch_compile_fullgraph():
    args, kwargs = _op_args()
    expected = copy.deepcopy(args)

    def step(p, g, s, t):
        torch.ops.pyoptim.adagrad_step_(p, g, s, t, **kwargs)

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
    if backend not in _backends.available("adagrad_step_", "cuda"):
        pytest.skip(f"{backend} is not built here")
    a, b, oa, ob = captured_steps_against(
        lambda ps: pyoptim.optim.Adagrad(ps, lr=torch.tensor(1e-2, device="cuda"), lr_decay=0.1, backend=backend),
        lambda ps: torch.optim.Adagrad(ps, lr=1e-2, lr_decay=0.1, foreach=False))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **TOL[torch.float32])
        assert float(oa.state[x]["step"]) == float(ob.state[y]["step"]) == 6
