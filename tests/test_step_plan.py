"""The step plan (note [step plan] in csrc/step_plan.cpp): every change a recorded plan depends on is seen.

Each test runs a pyoptim optimizer beside torch's for-loop twin, applies the
same change to both mid-run, and compares params and state after more steps.
`plan_steps` counts the steps the plan served, so a test also fails when the
plan silently stopped being used (or was never used) where it should be.
"""

from __future__ import annotations

import copy

import pytest
import torch

import pyoptim
from pyoptim.optim import _base

from .conftest import TOL

PLAN_BACKENDS = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def plan_steps(monkeypatch):
    """A dict whose "served" entry counts steps the plan ran, and "ordinary" those that took the ordinary path."""
    counts = {"served": 0, "ordinary": 0}
    run_plan = _base.FusedOptimizer._run_plan
    gather = _base.FusedOptimizer._gather

    def counting_run(self, *args):
        ok = run_plan(self, *args)
        counts["served"] += ok
        return ok

    def counting_gather(self):
        counts["ordinary"] += 1
        return gather(self)

    monkeypatch.setattr(_base.FusedOptimizer, "_run_plan", counting_run)
    monkeypatch.setattr(_base.FusedOptimizer, "_gather", counting_gather)
    return counts


def _pair(kind, device, n=6, dtype=torch.float32, **kw):
    """(ours, torch's, our params, torch's params) over n params of assorted shapes."""
    shapes = [(3, 5), (7,), (), (2, 3, 4), (1,), (65,)][:n]
    init = [torch.randn(s, dtype=dtype, device=device) for s in shapes]
    a = [p.clone().requires_grad_() for p in init]
    b = [p.clone().requires_grad_() for p in init]
    if kind == "adamw":
        ours = pyoptim.optim.AdamW(a, lr=1e-2, weight_decay=0.1, backend=device.type, **kw)
        theirs = torch.optim.AdamW(b, lr=1e-2, weight_decay=0.1, foreach=False)
    else:
        ours = pyoptim.optim.SGD(a, lr=0.1, momentum=0.9, weight_decay=0.01, backend=device.type, **kw)
        theirs = torch.optim.SGD(b, lr=0.1, momentum=0.9, weight_decay=0.01, foreach=False)
    return ours, theirs, a, b


def _grads(a, b, same=None):
    """New grad tensors for both (or, with `same`, the same values written into the existing grads)."""
    for p, q in zip(a, b):
        g = torch.randn_like(p)
        if same and p.grad is not None:
            p.grad.copy_(g)
            q.grad.copy_(g)
        else:
            p.grad, q.grad = g.clone(), g.clone()


def _steps(ours, theirs, a, b, k, same=False):
    for _ in range(k):
        _grads(a, b, same)
        ours.step()
        theirs.step()


def _assert_same(ours, theirs, a, b):
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, **TOL[torch.float32])
    for p, q in zip(a, b):
        for key, t in theirs.state[q].items():
            torch.testing.assert_close(ours.state[p][key].cpu().reshape(t.shape).to(t.dtype), t.cpu(),
                                       **TOL[torch.float32])


@pytest.mark.parametrize("device", PLAN_BACKENDS)
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
@pytest.mark.parametrize("same_grads", [False, True], ids=["new-grads", "same-grads"])
def test_steady_state_is_served_by_the_plan(kind, device, same_grads, plan_steps):
    ours, theirs, a, b = _pair(kind, torch.device(device))
    _steps(ours, theirs, a, b, 12, same_grads)
    _assert_same(ours, theirs, a, b)
    # The first step makes the state, the second records the plan.
    assert plan_steps["ordinary"] == 2 and plan_steps["served"] == 10


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_grad_set_to_none_skips_that_param(kind, plan_steps):
    ours, theirs, a, b = _pair(kind, torch.device("cpu"))
    _steps(ours, theirs, a, b, 3)
    _grads(a, b)
    a[2].grad = b[2].grad = None
    before = a[2].detach().clone()
    ours.step()
    theirs.step()
    assert torch.equal(a[2], before)
    _assert_same(ours, theirs, a, b)
    _steps(ours, theirs, a, b, 3)
    _assert_same(ours, theirs, a, b)
    assert plan_steps["served"] >= 2  # a plan again once every param has a grad


def test_param_data_replaced_is_seen(plan_steps):
    ours, theirs, a, b = _pair("adamw", torch.device("cpu"))
    _steps(ours, theirs, a, b, 3)
    fresh = torch.randn_like(a[0])
    with torch.no_grad():
        a[0].data = fresh.clone()
        b[0].data = fresh.clone()
    _steps(ours, theirs, a, b, 3)
    _assert_same(ours, theirs, a, b)


def test_param_data_of_another_shape_raises_before_writing():
    ours, theirs, a, b = _pair("adamw", torch.device("cpu"))
    _steps(ours, theirs, a, b, 3)
    a[1].data = torch.randn(9)
    for p in a:
        p.grad = torch.randn_like(p)
    snap = [p.detach().clone() for p in a], copy.deepcopy(ours.state_dict()["state"])
    with pytest.raises(RuntimeError, match="shape"):
        ours.step()
    for p, s in zip(a, snap[0]):
        assert torch.equal(p, s)
    for i, st in snap[1].items():
        for k, t in st.items():
            assert torch.equal(ours.state_dict()["state"][i][k], t)


def test_param_dtype_change_takes_the_ordinary_path(plan_steps):
    ours, theirs, a, b = _pair("adamw", torch.device("cpu"))
    _steps(ours, theirs, a, b, 3)
    served = plan_steps["served"]
    a[3].data = a[3].data.double()
    if hasattr(a[3], "grad_dtype"):  # torch >= 2.14 ties a grad's dtype to the param's creation dtype
        a[3].grad_dtype = None
    for p in a:
        p.grad = torch.randn_like(p)
    # As without a plan: the op refuses float64 params with float32 state.
    with pytest.raises(RuntimeError, match="dtype"):
        ours.step()
    assert plan_steps["served"] == served


def test_params_added_removed_and_replaced_in_groups(plan_steps):
    device = torch.device("cpu")
    ours, theirs, a, b = _pair("sgd", device)
    _steps(ours, theirs, a, b, 3)
    extra_a = torch.randn(4, requires_grad=True)
    extra_b = extra_a.detach().clone().requires_grad_()
    ours.add_param_group({"params": [extra_a], "lr": 0.05})
    theirs.add_param_group({"params": [extra_b], "lr": 0.05})
    a, b = a + [extra_a], b + [extra_b]
    _steps(ours, theirs, a, b, 3)
    _assert_same(ours, theirs, a, b)
    # Removed from its group: no longer stepped.
    ours.param_groups[0]["params"].pop(0)
    theirs.param_groups[0]["params"].pop(0)
    frozen = a[0].detach().clone()
    _steps(ours, theirs, a, b, 3)
    assert torch.equal(a[0], frozen)
    _assert_same(ours, theirs, a[1:], b[1:])
    # Replaced in place in the list (same length): the new param is stepped.
    new_a = torch.randn(3, requires_grad=True)
    new_b = new_a.detach().clone().requires_grad_()
    ours.param_groups[0]["params"][1] = new_a
    theirs.param_groups[0]["params"][1] = new_b
    a[2], b[2] = new_a, new_b
    _steps(ours, theirs, a, b, 3)
    assert "exp_avg" not in ours.state[new_a] and "momentum_buffer" in ours.state[new_a]
    _assert_same(ours, theirs, a[1:], b[1:])
    # Each change costs one or two ordinary steps (new state, then the recording one).
    assert plan_steps["served"] == 5


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_load_state_dict_mid_run(kind, plan_steps):
    ours, theirs, a, b = _pair(kind, torch.device("cpu"))
    _steps(ours, theirs, a, b, 4)
    # Hand torch's state (perturbed, so a stale plan would be caught) to ours.
    sd = copy.deepcopy(theirs.state_dict())
    for st in sd["state"].values():
        for k, t in st.items():
            if k != "step":
                t.mul_(0.5)
    theirs.load_state_dict(copy.deepcopy(sd))
    ours.load_state_dict(sd)
    _steps(ours, theirs, a, b, 4)
    _assert_same(ours, theirs, a, b)
    assert plan_steps["served"] >= 4


def test_state_tensor_replaced_is_read(plan_steps):
    ours, theirs, a, b = _pair("adamw", torch.device("cpu"))
    _steps(ours, theirs, a, b, 4)
    ours.state[a[1]]["exp_avg"] = torch.ones_like(a[1])
    theirs.state[b[1]]["exp_avg"] = torch.ones_like(b[1])
    _steps(ours, theirs, a, b, 3)
    _assert_same(ours, theirs, a, b)


def test_hyperparameters_changing_every_step(plan_steps):
    ours, theirs, a, b = _pair("adamw", torch.device("cpu"))
    sched = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10) for o in (ours, theirs)]
    for k in range(10):
        for o in (ours, theirs):
            o.param_groups[0]["betas"] = (0.9 - 0.01 * k, 0.999)
            o.param_groups[0]["weight_decay"] = 0.1 * k
        _steps(ours, theirs, a, b, 1)
        for s in sched:
            s.step()
    _assert_same(ours, theirs, a, b)
    assert plan_steps["served"] >= 8


def test_tensor_lr_changed_in_place(plan_steps):
    device = torch.device("cpu")
    init = [torch.randn(5) for _ in range(3)]
    a = [p.clone().requires_grad_() for p in init]
    b = [p.clone().requires_grad_() for p in init]
    lr_a, lr_b = torch.tensor(0.01), torch.tensor(0.01)
    ours = pyoptim.optim.Adam(a, lr=lr_a, backend=device.type)
    theirs = torch.optim.Adam(b, lr=lr_b, foreach=False)
    for k in range(6):
        lr_a.fill_(0.01 * (k + 1))
        lr_b.fill_(0.01 * (k + 1))
        _steps(ours, theirs, a, b, 1)
    _assert_same(ours, theirs, a, b)
    assert plan_steps["served"] >= 4


def test_max_grad_norm_switched_on_mid_run(plan_steps):
    ours, theirs, a, b = _pair("adamw", torch.device("cpu"))
    _steps(ours, theirs, a, b, 3)
    ours.max_grad_norm = 0.5
    for _ in range(4):
        _grads(a, b)
        ours.step()
        torch.nn.utils.clip_grad_norm_(b, 0.5)
        theirs.step()
    _assert_same(ours, theirs, a, b)
    assert plan_steps["served"] >= 2


def test_grad_scaler_skips_inf_steps(plan_steps):
    device = torch.device("cpu")
    ours, theirs, a, b = _pair("adamw", device)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    _steps(ours, theirs, a, b, 2)
    for k in range(5):
        loss = sum((p * torch.randn_like(p)).sum() for p in a)
        for p in a:
            p.grad = None
        scaler.scale(loss).backward()
        if k == 2:
            a[0].grad[...] = float("inf")
        snap = [p.detach().clone() for p in a], ours.state[a[0]]["step"].clone()
        scaler.step(ours)
        scaler.update()
        if k == 2:
            assert all(torch.equal(p, s) for p, s in zip(a, snap[0]))
            assert torch.equal(ours.state[a[0]]["step"], snap[1])
        else:
            assert not torch.equal(a[0], snap[0][0])
    assert plan_steps["served"] >= 3


def test_several_calls_check_every_call_before_writing(plan_steps):
    # Two buckets (float32 and float64 params); a bad lr in the second group
    # must raise before the first call writes.
    p32 = [torch.randn(4, requires_grad=True) for _ in range(2)]
    p64 = [torch.randn(4, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    opt = pyoptim.optim.AdamW([{"params": p32}, {"params": p64}], backend="cpu")
    for _ in range(3):
        for p in p32 + p64:
            p.grad = torch.randn_like(p)
        opt.step()
    assert plan_steps["served"] == 1
    opt.param_groups[1]["lr"] = -1.0
    snap = [p.detach().clone() for p in p32 + p64]
    with pytest.raises(RuntimeError, match="Invalid learning rate"):
        opt.step()
    assert all(torch.equal(p, s) for p, s in zip(p32 + p64, snap))


@pytest.mark.parametrize("ours_cls,torch_cls,kw", [
    (pyoptim.optim.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
    (pyoptim.optim.RMSprop, torch.optim.RMSprop, dict(lr=1e-2, momentum=0.9, centered=True)),
], ids=["SGD", "RMSprop"])
def test_several_calls_with_momentum_are_served(ours_cls, torch_cls, kw, plan_steps):
    # Two buckets with momentum: the plan's check of each call's hyperparameters (with empty lists) must not
    # take them for a group with momentum but no buffers.
    init = [torch.randn(4), torch.randn(5, dtype=torch.float64)]
    a = [p.clone().requires_grad_() for p in init]
    b = [p.clone().requires_grad_() for p in init]
    ours = ours_cls([{"params": [a[0]]}, {"params": [a[1]]}], backend="cpu", **kw)
    theirs = torch_cls([{"params": [b[0]]}, {"params": [b[1]]}], foreach=False, **kw)
    _steps(ours, theirs, a, b, 5)
    assert plan_steps["served"] == 3
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, **TOL[p.dtype])


def test_backend_from_the_environment_is_honoured(plan_steps, monkeypatch):
    ours, theirs, a, b = _pair("adamw", torch.device("cpu"))
    ours.param_groups[0]["backend"] = None
    _steps(ours, theirs, a, b, 3)
    served = plan_steps["served"]
    monkeypatch.setenv("PYOPTIM_BACKEND", "reference")
    calls = []
    monkeypatch.setattr(pyoptim.reference, "adam_step_ref",
                        (lambda f: lambda *x, **k: calls.append(1) or f(*x, **k))(pyoptim.reference.adam_step_ref))
    _steps(ours, theirs, a, b, 2)  # _backends.get reads the reference module's attribute each call: the patch is seen
    assert plan_steps["served"] == served and len(calls) == 2
    _assert_same(ours, theirs, a, b)


def test_plan_does_not_keep_old_grads_alive():
    import weakref

    ours, theirs, a, b = _pair("adamw", torch.device("cpu"))
    _steps(ours, theirs, a, b, 3)
    refs = [weakref.ref(p.grad) for p in a]
    for p in a:
        p.grad = None
    assert all(r() is None for r in refs)


def test_replayed_steps_are_seen_by_the_profiler(plan_steps):
    """The plan calls the backend kernels past the dispatcher's upper keys; the profiler still names the ops."""
    ours, _, a, _ = _pair("adamw", torch.device("cpu"), max_grad_norm=1.0)
    for p in a:
        p.grad = torch.randn_like(p)
    ours.step()  # makes the state
    ours.step()  # records
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ours.step()
    assert plan_steps["served"] == 1
    names = {e.name for e in prof.events()}
    assert "pyoptim::adam_step_" in names and "pyoptim::multi_tensor_norm" in names, sorted(names)[:40]


def test_replayed_steps_go_through_an_active_dispatch_mode(plan_steps):
    """Under a TorchDispatchMode the plan calls the ops through the dispatcher, so the mode sees them."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    for kind, op in (("adamw", "pyoptim.adam_step_.default"), ("sgd", "pyoptim.sgd_step_.default")):
        ours, theirs, a, b = _pair(kind, torch.device("cpu"))
        for _ in range(3):
            _grads(a, b)
            ours.step()
            theirs.step()
        served = plan_steps["served"]
        _grads(a, b)
        with Seen() as mode:
            ours.step()
        theirs.step()
        assert plan_steps["served"] == served + 1
        assert op in mode.ops, mode.ops
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, **TOL[torch.float32])


@pytest.mark.parametrize("numel", [1, 3, 15, 16, 17, 31, 33])
def test_tails_of_every_length(numel):
    """Each tensor's last partial vector (masked on AVX512) updates exactly its own elements."""
    init = [torch.randn(numel) for _ in range(5)]
    a = [p.clone().requires_grad_() for p in init]
    b = [p.clone().requires_grad_() for p in init]
    # Neighbours in one storage: a tail that wrote past its end would change the next one.
    flat = torch.zeros(5 * numel + 3)
    views = [flat[i * numel:(i + 1) * numel] for i in range(5)]
    for v, p in zip(views, a):
        v.copy_(p.detach())
    ours = pyoptim.optim.AdamW(views, lr=1e-2, weight_decay=0.1, backend="cpu")
    theirs = torch.optim.AdamW(b, lr=1e-2, weight_decay=0.1, foreach=False)
    for _ in range(3):
        for v, p in zip(views, b):
            g = torch.randn(numel)
            v.grad = g.clone()
            p.grad = g
        ours.step()
        theirs.step()
    for v, p in zip(views, b):
        torch.testing.assert_close(v, p.detach(), **TOL[torch.float32])
    assert torch.equal(flat[5 * numel:], torch.zeros(3))


def test_step_hooks_registered_mid_run_are_called(plan_steps):
    """The steady-state step skips torch's step wrapper only while no hook is registered."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    ours, theirs, a, b = _pair("sgd", torch.device("cpu"))
    _steps(ours, theirs, a, b, 3)
    seen = []

    def mine(name):
        def hook(o, args, kwargs):
            if o is ours:
                seen.append(name)
        return hook

    handles = [ours.register_step_pre_hook(lambda o, args, kw: seen.append("pre")),
               ours.register_step_post_hook(lambda o, args, kw: seen.append("post")),
               # (global hooks see torch's optimizer too: counted for ours only)
               register_optimizer_step_pre_hook(mine("global pre")),
               register_optimizer_step_post_hook(mine("global post"))]
    try:
        served = plan_steps["served"]
        _steps(ours, theirs, a, b, 2)
        assert seen == ["global pre", "pre", "post", "global post"] * 2
        assert plan_steps["served"] == served + 2  # the plan still serves the step, inside the wrapper
    finally:
        for h in handles:
            h.remove()
    _steps(ours, theirs, a, b, 2)
    assert len(seen) == 8
    _assert_same(ours, theirs, a, b)


def test_grad_mode_is_restored_by_every_step(plan_steps):
    ours, theirs, a, b = _pair("adamw", torch.device("cpu"))
    _steps(ours, theirs, a, b, 3)
    assert torch.is_grad_enabled() and plan_steps["served"] == 1
    with torch.no_grad():
        _steps(ours, theirs, a, b, 1)
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()
    # A step that raises (the op's check of a hyperparameter, in the plan's step) restores it too.
    _grads(a, b)
    served = plan_steps["served"]
    ours.param_groups[0]["lr"] = -1.0
    with pytest.raises((RuntimeError, ValueError), match="Invalid learning rate"):
        ours.step()
    assert torch.is_grad_enabled() and plan_steps["served"] == served


@pytest.mark.parametrize("ours_cls, torch_cls, kw", [
    (pyoptim.optim.Adagrad, torch.optim.Adagrad, dict(lr=0.1, weight_decay=0.01)),
    (pyoptim.optim.RMSprop, torch.optim.RMSprop, dict(lr=0.01, momentum=0.9, centered=True)),
    (pyoptim.optim.Adam, torch.optim.Adam, dict(lr=1e-2, amsgrad=True)),
], ids=["Adagrad", "RMSprop", "Adam-amsgrad"])
def test_every_step_op_is_replayed_unboxed(ours_cls, torch_cls, kw, plan_steps):
    """note [unboxed replay]: each op of csrc/step_ops.h is called through its typed signature; a signature that
    read an argument from the wrong position would change the result (or fail the dispatcher's type check)."""
    init = [torch.randn(s) for s in [(3, 5), (7,), (), (2, 3, 4)]]
    a = [p.clone().requires_grad_() for p in init]
    b = [p.clone().requires_grad_() for p in init]
    ours, theirs = ours_cls(a, backend="cpu", **kw), torch_cls(b, foreach=False, **kw)
    _steps(ours, theirs, a, b, 6)
    # At most two ordinary steps (state made, plan recorded; Adagrad makes its state up front).
    assert plan_steps["served"] >= 4 and plan_steps["served"] + plan_steps["ordinary"] == 6
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, **TOL[torch.float32])


def test_grads_in_another_layout_are_copied_by_the_replayed_op(plan_steps):
    """A grad that is not dense in its param's layout (a transposed view, a slice) is a work copy inside the op
    (note [one pass]: the scan marks that tensor, prepare_work copies only it); dense ones beside it are not."""
    shapes = [(4, 6), (5,), (3, 4), (8, 2)]
    init = [torch.randn(s) for s in shapes]
    a = [p.clone().requires_grad_() for p in init]
    b = [p.clone().requires_grad_() for p in init]
    ours = pyoptim.optim.AdamW(a, lr=1e-2, weight_decay=0.1, backend="cpu")
    theirs = torch.optim.AdamW(b, lr=1e-2, weight_decay=0.1, foreach=False)
    for step in range(6):
        for i, (p, q) in enumerate(zip(a, b)):
            if i in (0, 3) and step % 2:
                g = torch.randn(tuple(reversed(p.shape))).t()  # strides not the param's
            elif i == 2 and step % 2:
                g = torch.randn(p.shape[0], 2 * p.shape[1])[:, ::2]  # not dense
            else:
                g = torch.randn_like(p)
            p.grad, q.grad = g.clone() if g.is_contiguous() else g, g.contiguous()
        ours.step()
        theirs.step()
    assert plan_steps["served"] == 4
    _assert_same(ours, theirs, a, b)


def test_replayed_steps_record_their_inputs(plan_steps):
    """With record_shapes the profiler asks for the op's inputs: the replay hands it the boxed arguments of this
    step (its lr among them), as the dispatcher hands them on the ordinary path."""
    ours, _, a, _ = _pair("adamw", torch.device("cpu"))
    recorded = []
    for lr in (1e-2, 2e-2, 3e-2):
        ours.param_groups[0]["lr"] = lr
        for p in a:
            p.grad = torch.randn_like(p)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            ours.step()
        events = [e for e in prof.events() if e.name == "pyoptim::adam_step_"]
        assert len(events) == 1
        recorded.append(events[0])
    assert plan_steps["served"] == 1  # the third step
    ordinary, served = recorded[1], recorded[2]
    assert len(served.input_shapes) == len(ordinary.input_shapes) == 24
    assert served.concrete_inputs[6] == [3e-2] and ordinary.concrete_inputs[6] == [2e-2]
    assert served.concrete_inputs[7:] == ordinary.concrete_inputs[7:]


def test_a_replayed_step_that_raises_keeps_no_grads_and_writes_nothing(plan_steps):
    import weakref

    ours, theirs, a, b = _pair("adamw", torch.device("cpu"))
    _steps(ours, theirs, a, b, 3)
    assert plan_steps["served"] == 1
    before = [p.detach().clone() for p in a]
    state_before = {k: t.clone() for k, t in ours.state[a[0]].items()}
    ours.param_groups[0]["lr"] = -1.0  # the op's own check raises (the plan checks no hyperparameter itself)
    for p in a:
        p.grad = torch.randn_like(p)
    with pytest.raises((RuntimeError, ValueError), match="Invalid learning rate"):
        ours.step()
    for p, q in zip(a, before):
        assert torch.equal(p.detach(), q)
    for k, t in state_before.items():
        assert torch.equal(ours.state[a[0]][k], t)
    refs = [weakref.ref(p.grad) for p in a]
    for p in a:
        p.grad = None
    assert all(r() is None for r in refs)
