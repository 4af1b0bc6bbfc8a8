"""Flat storage (note [flat storage] in pyoptim/optim/_flat.py): the same training as the ordinary path, one op
call per group in the steady state, and the right answer when a user breaks the layout."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import pyoptim

from .conftest import TOL


class _OpCalls(TorchDispatchMode):
    """Records the number of params of every pyoptim step op call made inside it."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "pyoptim" and func.__name__.split(".")[0].endswith("_step_"):
            self.sizes.append(len(args[0]))
        return func(*args, **(kwargs or {}))


def _mlp():
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def _convnet():
    # No conv bias before a BatchNorm: its grad is zero in exact arithmetic, and
    # Adam would normalize the rounding noise into updates of size lr.
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, bias=False),
                        nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    net[3].weight.data = net[3].weight.data.contiguous(memory_format=torch.channels_last)  # a strided slot
    return net


def _data(kind, k):
    g = torch.Generator().manual_seed(100 + k)
    if kind == "mlp":
        return torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    return torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 4, (4,), generator=g)


def _optimizers(model, name, flat):
    if name == "adamw":
        return pyoptim.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, flat=flat, backend="cpu",
                                   max_grad_norm=1.0 if flat is not None else None)
    return pyoptim.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, flat=flat, backend="cpu")


def _train(model, opt, kind, steps, set_to_none, micro=1, freeze_at=None, loss_scale=1.0):
    for k in range(steps):
        if freeze_at is not None and k == freeze_at:
            frozen = model[-1].bias
            frozen.requires_grad_(False)
            frozen.grad = None
        opt.zero_grad(set_to_none=set_to_none)
        for m in range(micro):
            x, y = _data(kind, k * micro + m)
            loss = nn.functional.cross_entropy(model(x), y) * loss_scale
            loss.backward()
        opt.step()


@pytest.mark.parametrize("kind", ["mlp", "convnet"])
@pytest.mark.parametrize("name", ["adamw", "sgd"])
@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("micro", [1, 2], ids=["one-batch", "accumulate-2"])
def test_flat_trains_as_the_ordinary_path(kind, name, set_to_none, micro):
    torch.manual_seed(0)
    base = _mlp() if kind == "mlp" else _convnet()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    oa, ob = _optimizers(a, name, True), _optimizers(b, name, False)
    _train(a, oa, kind, 20, set_to_none, micro, freeze_at=12)
    _train(b, ob, kind, 20, set_to_none, micro, freeze_at=12)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, **TOL[torch.float32])
    for p, q in zip(a.parameters(), b.parameters()):
        for key, t in ob.state[q].items():
            torch.testing.assert_close(oa.state[p][key], t, **TOL[torch.float32])
    for (pa, ta), (pb, tb) in zip(a.named_buffers(), b.named_buffers()):
        torch.testing.assert_close(ta, tb)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_steady_state_is_one_call_per_group(name):
    torch.manual_seed(0)
    model = _mlp()
    opt = _optimizers(model, name, True)
    _train(model, opt, "mlp", 3, set_to_none=False)
    units = {id(u): u for u in opt._flat_units.values()}.values()
    assert len(units) == 1
    unit = next(iter(units))
    with _OpCalls() as calls:
        _train(model, opt, "mlp", 2, set_to_none=False)
    assert calls.sizes == [1, 1]
    for j, p in enumerate(unit.params):
        assert p.data_ptr() == unit.view(unit.param_buffer, j).data_ptr()
        assert p.grad.data_ptr() == unit.grad_slot(j).data_ptr()


def test_matches_torch_with_clip_and_state_dict_round_trips():
    torch.manual_seed(0)
    base = _mlp()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    oa = pyoptim.optim.AdamW(a.parameters(), lr=1e-2, flat=True, max_grad_norm=0.5)
    ob = torch.optim.AdamW(b.parameters(), lr=1e-2, foreach=False)
    for k in range(12):
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            x, y = _data("mlp", k)
            nn.functional.cross_entropy(m(x), y).backward()
        oa.step()
        torch.nn.utils.clip_grad_norm_(b.parameters(), 0.5)
        ob.step()
        if k == 5:  # ours -> torch and torch -> ours, mid-run
            sd_a, sd_b = copy.deepcopy(oa.state_dict()), copy.deepcopy(ob.state_dict())
            ob.load_state_dict(sd_a)
            oa.load_state_dict(sd_b)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, **TOL[torch.float32])
    # The loaded state lives in the flat buffers again.
    unit = oa._flat_units[id(next(a.parameters()))]
    p0 = next(a.parameters())
    assert oa.state[p0]["exp_avg"].data_ptr() == unit.view(unit.state_buffers["exp_avg"], 0).data_ptr()
    # state_dict holds per-param tensors of the params' shapes.
    sd = oa.state_dict()
    for i, p in enumerate(a.parameters()):
        assert sd["state"][i]["exp_avg"].shape == p.shape


def test_user_breaking_the_layout_gets_the_right_answer():
    torch.manual_seed(0)
    base = _mlp()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    oa = pyoptim.optim.SGD(a.parameters(), lr=0.05, momentum=0.9, flat=True)
    ob = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9, foreach=False)
    pa, pb = list(a.parameters()), list(b.parameters())
    unit = oa._flat_units[id(pa[0])]

    def step(k, edit=None):
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad(set_to_none=False)
            x, y = _data("mlp", k)
            nn.functional.cross_entropy(m(x), y).backward()
        if edit:
            edit()
        oa.step()
        ob.step()

    for k in range(3):
        step(k)
    # p.grad = t: the step uses t (copied into the slot; the grad is the slot again).
    def assign_grad():
        g = torch.randn_like(pa[2])
        pa[2].grad, pb[2].grad = g.clone(), g.clone()
    step(3, assign_grad)
    assert pa[2].grad.data_ptr() == unit.grad_slot(2).data_ptr()
    # p.data = t: the new data is what is updated; the buffer's old slot is not.
    def replace_data():
        t = torch.randn_like(pa[0])
        pa[0].data, pb[0].data = t.clone(), t.clone()
    step(4, replace_data)
    slot_before = unit.view(unit.param_buffer, 0).clone()
    for k in range(5, 9):
        step(k)
    assert torch.equal(unit.view(unit.param_buffer, 0), slot_before)
    for p, q in zip(pa, pb):
        torch.testing.assert_close(p, q, **TOL[torch.float32])


class _AtenCalls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_zero_grad_without_none_is_one_fill():
    model = _mlp()
    opt = pyoptim.optim.AdamW(model.parameters(), flat=True)
    _train(model, opt, "mlp", 3, set_to_none=False)
    unit = opt._flat_units[id(next(model.parameters()))]
    assert float(unit.grad_buffer.abs().sum()) > 0
    with _AtenCalls() as calls:
        opt.zero_grad(set_to_none=False)
    assert calls.names.count("zero_.default") == 1  # the buffer, not one per param
    assert float(unit.grad_buffer.abs().sum()) == 0.0
    for j, p in enumerate(unit.params):
        assert p.grad.data_ptr() == unit.grad_slot(j).data_ptr()


def test_flat_refuses_what_it_cannot_hold():
    # A non-dense param stays out of the flat buffer and is stepped on its own.
    dense = torch.randn(4, 4, requires_grad=True)
    strided = torch.randn(4, 8)[:, ::2].detach().requires_grad_()
    opt = pyoptim.optim.AdamW([dense, strided], flat=True)
    assert id(dense) in opt._flat_units and id(strided) not in opt._flat_units
    ref = torch.optim.AdamW([dense.detach().clone().requires_grad_(), strided.detach().clone().requires_grad_()],
                            foreach=False)
    for _ in range(4):
        for p, q in zip([dense, strided], ref.param_groups[0]["params"]):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for p, q in zip([dense, strided], ref.param_groups[0]["params"]):
        torch.testing.assert_close(p, q, **TOL[torch.float32])
