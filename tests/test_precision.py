"""The precision policy (issue 15; note [precision policy] in pyoptim/optim/_base.py): master_weights
None / "fp32" / "remainder" / "stochastic", state_dtype, and checkpoints that keep them.

The oracle of "fp32" and "remainder" is an fp32-param run of the same backend fed the same grads (bf16 values,
so both runs see the same numbers): its params must equal the masters bit for bit at every step. The oracle of
the bits themselves (remainder split, stochastic draws) is pyoptim.reference, in plain torch integer ops.
"""

from __future__ import annotations

import copy

import pytest
import torch

import pyoptim
from pyoptim.reference import param_fp32

from .conftest import impl_id, impls

ADAM_IMPLS = impls("adam_step_")
SHAPES = [(37,), (5, 7), (1,), (300,)]  # odd sizes: partial vectors and chunk tails


def _device(impl):
    return torch.device("cuda" if impl[0] == "cuda" else "cpu")


def _groups(params, wd):
    # Two groups, weight decay on in one and (optionally) off in the other: several groups in one call.
    return [dict(params=params[:2], weight_decay=wd), dict(params=params[2:], lr=3e-3, weight_decay=0.0)]


def _masters(opt, params, policy):
    """The fp32 master of each param as its policy keeps it."""
    out = []
    for p in params:
        st = opt.state[p]
        if policy == "fp32":
            out.append(st["master_param"])
        else:
            out.append(param_fp32(p, 0, None, [st["param_remainder"]]))
    return out


def _init(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).bfloat16().float().to(device) for s in SHAPES]


@pytest.mark.parametrize("impl", ADAM_IMPLS, ids=impl_id)
@pytest.mark.parametrize("policy", ["fp32", "remainder"])
@pytest.mark.parametrize("cls, wd", [(pyoptim.optim.AdamW, 0.1), (pyoptim.optim.Adam, 0.01), (pyoptim.optim.AdamW, 0.0)])
def test_masters_bit_identical_to_fp32_run(impl, policy, cls, wd):
    device = _device(impl)
    steps = 100 if impl[1] != "triton" else 30  # the interpreter: ~0.1 s a step
    ref = [p.clone().requires_grad_() for p in _init(device)]
    low = [p.bfloat16().requires_grad_() for p in _init(device)]
    o_ref = cls(_groups(ref, wd), lr=1e-2, backend=impl[1])
    o_low = cls(_groups(low, wd), lr=1e-2, backend=impl[1], master_weights=policy)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        grads = [torch.randn(p.shape, generator=g).bfloat16().to(device) for p in ref]
        for a, b, gr in zip(ref, low, grads):
            a.grad, b.grad = gr.float(), gr.clone()
        o_ref.step()
        o_low.step()
        if step % 10 == 9 or step == 0:
            for a, b, m in zip(ref, low, _masters(o_low, low, policy)):
                assert torch.equal(m, a.detach()), f"master differs at step {step + 1}"
                if policy == "fp32":
                    assert torch.equal(b.detach(), a.detach().bfloat16())
                else:  # rounded to nearest, an exact tie either way
                    assert ((b.detach().float() - a.detach().bfloat16().float()).abs()
                            <= (a.detach().bfloat16().float().abs() * 2**-8)).all()
    for p in low:
        st = o_low.state[p]
        assert st["exp_avg"].dtype == torch.float32 and st["exp_avg_sq"].dtype == torch.float32
        assert ("master_param" in st) == (policy == "fp32") and ("param_remainder" in st) == (policy == "remainder")


@pytest.mark.parametrize("impl", ADAM_IMPLS, ids=impl_id)
def test_fp16_masters(impl):
    device = _device(impl)
    ref = [p.half().float().requires_grad_() for p in _init(device)]
    low = [p.detach().half().requires_grad_() for p in ref]
    o_ref = pyoptim.optim.AdamW(ref, lr=1e-2, backend=impl[1])
    o_low = pyoptim.optim.AdamW(low, lr=1e-2, backend=impl[1], master_weights="fp32")
    for _ in range(10):
        for a, b in zip(ref, low):
            gr = torch.randn(a.shape).half().to(device)
            a.grad, b.grad = gr.float(), gr
        o_ref.step()
        o_low.step()
    for a, b in zip(ref, low):
        assert torch.equal(o_low.state[b]["master_param"], a.detach())
        assert torch.equal(b.detach(), a.detach().half())


def _stochastic_run(impl, seed, steps=5):
    device = _device(impl)
    ps = [p.bfloat16().requires_grad_() for p in _init(device)]
    opt = pyoptim.optim.AdamW(ps, lr=1e-2, backend=impl[1], master_weights="stochastic", stochastic_seed=seed)
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g).bfloat16().to(device)
        opt.step()
    return [p.detach().cpu() for p in ps]


def test_stochastic_reproducible_across_backends():
    # Every backend draws the same bits: reference's plain-torch hash is the oracle.
    runs = {impl: _stochastic_run(impl, seed=7) for impl in ADAM_IMPLS}
    first = runs[ADAM_IMPLS[0]]
    for impl, r in runs.items():
        for a, b in zip(first, r):
            assert torch.equal(a, b), impl
    other = _stochastic_run(ADAM_IMPLS[0], seed=8)
    assert any(not torch.equal(a, b) for a, b in zip(first, other)), "the seed changes the draws"


@pytest.mark.parametrize("impl", ADAM_IMPLS, ids=impl_id)
def test_stochastic_rounding_unbiased(impl):
    # One Adam step from 1.0 moves each element by about lr = 3 * 2^-10, 3/8 of the bf16 ulp above 1: the
    # mean of the n stochastic roundings stays within 4 standard errors of the fp32 result (the same backend's
    # fp32-param step), and only the two neighbours occur.
    device = _device(impl)
    n = 1 << 14
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        p = torch.ones(n, dtype=dtype, device=device, requires_grad=True)
        opt = pyoptim.optim.AdamW([p], lr=3 * 2**-10, weight_decay=0.0, backend=impl[1], stochastic_seed=3,
                                  master_weights="stochastic")
        p.grad = torch.full_like(p, -1.0)
        opt.step()
        out[dtype] = p.detach().float().cpu()
    exact = float(out[torch.float32][0])
    vals = out[torch.bfloat16]
    lo, hi = 1.0, 1.0 + 2**-7
    assert ((vals == lo) | (vals == hi)).all()
    frac = (exact - lo) / (hi - lo)
    se = (frac * (1 - frac) / n) ** 0.5 * (hi - lo)
    assert abs(float(vals.double().mean()) - exact) <= 4 * se


@pytest.mark.parametrize("impl", ADAM_IMPLS, ids=impl_id)
def test_tiny_updates_stall_unless_stochastic(impl):
    # lr * update far below half a bf16 ulp: round to nearest never moves the param; stochastic rounding
    # tracks the fp32 run (mean error well under the total drift).
    device = _device(impl)
    n, steps = 4096, 200 if impl[1] != "triton" else 60
    lr = 2**-14  # Adam's update is about lr per step; bf16's half ulp at 1 is 2^-8
    runs = {}
    for policy in (None, "stochastic", "fp32"):
        p = torch.ones(n, dtype=torch.float32 if policy == "fp32" else torch.bfloat16, device=device,
                       requires_grad=True)
        opt = pyoptim.optim.Adam([p], lr=lr, backend=impl[1], master_weights=policy)
        for _ in range(steps):
            p.grad = torch.full_like(p, -1.0)
            opt.step()
        runs[policy] = p.detach().float().cpu()
    drift = float(runs["fp32"].mean() - 1.0)
    assert drift > 0.5 * steps * lr
    assert torch.equal(runs[None], torch.ones(n)), "round to nearest stalls"
    assert abs(float(runs["stochastic"].mean()) - float(runs["fp32"].mean())) < 0.1 * drift


@pytest.mark.parametrize("impl", ADAM_IMPLS, ids=impl_id)
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_bf16_state(impl, param_dtype):
    # state_dtype=bfloat16: the moments are the fp32 run's rounded to bf16 after each step (the reference's).
    device = _device(impl)
    ps = [p.to(param_dtype).requires_grad_() for p in _init(device)]
    qs = [p.detach().clone().requires_grad_() for p in ps]
    kw = dict(lr=1e-2, state_dtype=torch.bfloat16)
    oa = pyoptim.optim.AdamW(ps, backend=impl[1], **kw)
    ob = pyoptim.optim.AdamW(qs, backend="reference", **kw)
    for _ in range(10):
        for a, b in zip(ps, qs):
            a.grad = torch.randn(a.shape).to(device, param_dtype)
            b.grad = a.grad.clone()
        oa.step()
        ob.step()
    for a, b in zip(ps, qs):
        assert oa.state[a]["exp_avg"].dtype == torch.bfloat16
        if impl[1] == "triton" or param_dtype == torch.bfloat16:
            torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-2)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(oa.state[a]["exp_avg_sq"].float(), ob.state[b]["exp_avg_sq"].float(),
                                   rtol=2e-2, atol=1e-6)


def test_memory_per_param():
    # bf16 AdamW with remainders and bf16 state: 2 (param) + 2 (remainder) + 2 + 2 (moments) = 8 bytes.
    p = torch.zeros(1000, dtype=torch.bfloat16, requires_grad=True)
    opt = pyoptim.optim.AdamW([p], master_weights="remainder", state_dtype=torch.bfloat16, backend="reference")
    p.grad = torch.zeros_like(p)
    opt.step()
    state_bytes = sum(t.numel() * t.element_size() for t in opt.state[p].values() if t.dim() > 0)
    assert (state_bytes + p.numel() * p.element_size()) / p.numel() == 8


@pytest.mark.parametrize("kwargs, dtype", [
    (dict(master_weights="remainder"), torch.float16),
    (dict(master_weights="remainder"), torch.float32),
    (dict(master_weights="bf16"), torch.bfloat16),
    (dict(master_weights="stochastic"), torch.float16),
    (dict(state_dtype=torch.int8), torch.float32),
    (dict(state_dtype="bfloat16"), torch.float32),
    (dict(state_dtype=torch.float16), torch.float32),
    (dict(state_dtype=torch.float32), torch.float64),
])
def test_bad_combinations_raise_at_construction(kwargs, dtype):
    p = torch.zeros(3, dtype=dtype, requires_grad=True)
    with pytest.raises(ValueError):
        pyoptim.optim.AdamW([p], **kwargs)
    with pytest.raises(ValueError):  # a group's own setting too
        pyoptim.optim.AdamW([dict(params=[p], **kwargs)])


def _train(policy, state_dtype=None, steps=6, params=None, opt=None, backend="reference"):
    if params is None:
        params = [p.bfloat16().requires_grad_() for p in _init(torch.device("cpu"))]
    if opt is None:
        opt = pyoptim.optim.AdamW(params, lr=1e-2, master_weights=policy, state_dtype=state_dtype,
                                  stochastic_seed=5, backend=backend)
    g = torch.Generator().manual_seed(9)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        opt.step()
    return params, opt


@pytest.mark.parametrize("policy", [None, "fp32", "remainder", "stochastic"])
@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16])
def test_checkpoint_keeps_dtypes_and_resumes_exactly(policy, state_dtype):
    # Save at step 3, load into a fresh optimizer over copies of the params, run 3 more: the same bits as 6
    # straight steps (stochastic included: the draws depend on the seed and the step only).
    ps, opt = _train(policy, state_dtype, steps=3)
    sd = copy.deepcopy(opt.state_dict())
    dtypes = {k: v.dtype for k, v in sd["state"][0].items()}
    qs = [p.detach().clone().requires_grad_() for p in ps]
    fresh = pyoptim.optim.AdamW(qs, lr=1e-2, master_weights=policy, state_dtype=state_dtype, backend="reference")
    fresh.load_state_dict(sd)
    assert {k: v.dtype for k, v in fresh.state[qs[0]].items()} == dtypes
    g = torch.Generator().manual_seed(10)
    for _ in range(3):
        for p, q in zip(ps, qs):
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
            q.grad = p.grad.clone()
        opt.step()
        fresh.step()
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)
        for k, v in opt.state[p].items():
            assert torch.equal(v, fresh.state[q][k]), k


def test_checkpoint_fp32_to_remainder_and_back_is_exact():
    ps, opt = _train("fp32", steps=4)
    masters = [opt.state[p]["master_param"].clone() for p in ps]
    qs = [p.detach().clone().requires_grad_() for p in ps]
    rem = pyoptim.optim.AdamW(qs, lr=1e-2, master_weights="remainder", backend="reference")
    rem.load_state_dict(opt.state_dict())
    assert all("master_param" not in rem.state[q] for q in qs)
    for q, m in zip(qs, masters):
        assert torch.equal(param_fp32(q, 0, None, [rem.state[q]["param_remainder"]]), m)
        assert rem.state[q]["exp_avg"].dtype == torch.float32
    rs = [q.detach().clone().requires_grad_() for q in qs]
    back = pyoptim.optim.AdamW(rs, lr=1e-2, master_weights="fp32", backend="reference")
    back.load_state_dict(rem.state_dict())
    for r, m in zip(rs, masters):
        assert torch.equal(back.state[r]["master_param"], m)


def test_checkpoint_to_and_from_torch():
    # A torch.optim checkpoint (no policy) loads into an optimizer with fp32 masters, which makes them from the
    # params and its moments fp32 from torch's bf16; its checkpoint loads back into torch.optim, which
    # ignores the masters and casts the moments to bf16 (torch's rule); without a policy the round trip is
    # exact both ways.
    ps = [p.bfloat16().requires_grad_() for p in _init(torch.device("cpu"))]
    t = torch.optim.AdamW(ps, lr=1e-2, foreach=False)
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn(p.shape).bfloat16()
        t.step()
    rs = [p.detach().clone().requires_grad_() for p in ps]
    ours = pyoptim.optim.AdamW(rs, lr=1e-2, master_weights="fp32", backend="reference")
    ours.load_state_dict(t.state_dict())
    assert ours.param_groups[0]["master_weights"] == "fp32"
    for p, r in zip(ps, rs):
        assert torch.equal(ours.state[r]["master_param"], r.detach().float())
        assert ours.state[r]["exp_avg"].dtype == torch.float32
        assert torch.equal(ours.state[r]["exp_avg"], t.state[p]["exp_avg"].float())
    _train("fp32", params=rs, opt=ours, steps=2)
    qs = [r.detach().clone().requires_grad_() for r in rs]
    t2 = torch.optim.AdamW(qs, lr=1e-2, foreach=False)
    t2.load_state_dict(ours.state_dict())
    for q, r in zip(qs, rs):
        assert t2.state[q]["exp_avg"].dtype == torch.bfloat16
        assert torch.equal(t2.state[q]["exp_avg"], ours.state[r]["exp_avg"].bfloat16())
    plain = [r.detach().clone().requires_grad_() for r in rs]
    none = pyoptim.optim.AdamW(plain, lr=1e-2, backend="reference")
    none.load_state_dict(t2.state_dict())
    for p, q in zip(plain, qs):
        assert "master_param" not in none.state[p]  # (torch kept it, cast to bf16: policy None drops it)
        for k, v in t2.state[q].items():
            if k != "master_param":
                assert torch.equal(none.state[p][k], v) and none.state[p][k].dtype == v.dtype, k


def _assert_found_inf_skips(opt, ps, policy):
    """GradScaler's found_inf with inf grads: the step leaves params and every state tensor as they were."""
    before = [p.detach().clone() for p in ps]
    st = copy.deepcopy(opt.state_dict()["state"])
    opt.found_inf = torch.ones((), device=ps[0].device)
    for p in ps:
        p.grad = torch.full_like(p, float("inf"))
    opt.step()
    del opt.found_inf
    assert all(torch.equal(a, b) for a, b in zip(before, ps))
    for i, p in enumerate(ps):
        for k, v in opt.state[p].items():
            assert torch.equal(v, st[i][k]), (policy, k)


def test_grad_scaler_skips_with_every_policy():
    for policy in ("fp32", "remainder", "stochastic"):
        ps, opt = _train(policy, steps=2)
        _assert_found_inf_skips(opt, ps, policy)


@pytest.mark.parametrize("impl", ADAM_IMPLS, ids=impl_id)
def test_small_model_loss_tracks_fp32(impl):
    # A bf16 MLP regression in each policy: its loss curve stays within 5% (fp32/remainder: 2%) of the fp32
    # model's, whose weights start equal.
    device = _device(impl)
    torch.manual_seed(0)
    x = torch.randn(256, 16, device=device)
    y = torch.sin(x.sum(1, keepdim=True))
    base = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)).to(device)
    for p in base.parameters():
        p.data = p.data.bfloat16().float()
    steps = 60 if impl[1] != "triton" else 20
    curves = {}
    for policy in ("ref", None, "fp32", "remainder", "stochastic"):
        model = copy.deepcopy(base)
        if policy != "ref":
            model = model.bfloat16()
        opt = pyoptim.optim.AdamW(model.parameters(), lr=3e-3, backend=impl[1],
                                  master_weights=None if policy == "ref" else policy)
        losses = []
        for _ in range(steps):
            loss = torch.nn.functional.mse_loss(model(x.to(next(model.parameters()).dtype)).float(), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves[policy] = torch.tensor(losses)
    ref = curves["ref"]
    for policy, tol in ((None, 0.1), ("fp32", 0.05), ("remainder", 0.05), ("stochastic", 0.1)):
        rel = ((curves[policy] - ref).abs() / ref).max().item()
        assert rel < tol, (policy, rel)


@pytest.mark.skipif(not pyoptim._backends.EXTENSION_LOADED, reason="the extension is not built")
@pytest.mark.parametrize("policy", ["fp32", "remainder", "stochastic", "bf16state"])
def test_opcheck(policy):
    # The schema's aliasing of master_params / param_remainders, the fake kernel and the CPU kernel agree.
    shapes = [(5,), (2, 3), ()]
    p = [torch.randn(s).bfloat16() for s in shapes]
    state_dtype = torch.bfloat16 if policy == "bf16state" else torch.float32
    st = lambda: [torch.randn(s).abs().to(state_dtype) for s in shapes]  # noqa: E731
    args = (p, [torch.randn(s).bfloat16() for s in shapes], st(), st(), [], [torch.tensor(2.0) for _ in shapes])
    kwargs = dict(lr=[1e-3], beta1=[0.9], beta2=[0.999], weight_decay=[0.1], eps=[1e-8], group_sizes=[3],
                  amsgrad=False, maximize=False, decoupled_weight_decay=True)
    if policy == "fp32":
        kwargs["master_params"] = [x.float() for x in p]
    elif policy == "remainder":
        kwargs["param_remainders"] = [torch.zeros(s, dtype=torch.int16) for s in shapes]
    elif policy == "stochastic":
        kwargs["stochastic_seed"] = 11
    torch.library.opcheck(torch.ops.pyoptim.adam_step_, args, kwargs)


@pytest.mark.parametrize("impl", ADAM_IMPLS, ids=impl_id)
def test_bad_op_arguments_raise(impl):
    # The op's own checks (every backend): two policies at once, masters of the wrong dtype, remainders beside
    # fp16 params, state of two dtypes.
    p = [torch.zeros(3, dtype=torch.bfloat16)]
    base = (p, [torch.zeros(3, dtype=torch.bfloat16)], [torch.zeros(3)], [torch.zeros(3)], [], [torch.tensor(0.0)])
    kw = dict(lr=[1e-3], beta1=[0.9], beta2=[0.999], weight_decay=[0.0], eps=[1e-8], backend=impl[1])
    bad = [dict(master_params=[torch.zeros(3)], stochastic_seed=1),
           dict(master_params=[torch.zeros(3, dtype=torch.bfloat16)]),
           dict(param_remainders=[torch.zeros(3)])]
    for extra in bad:
        with pytest.raises(RuntimeError):
            pyoptim.functional.adam_step_(*base, **kw, **extra)
    with pytest.raises(RuntimeError):
        pyoptim.functional.adam_step_(*base[:3], [torch.zeros(3, dtype=torch.bfloat16)], *base[4:], **kw)
    half = [torch.zeros(3, dtype=torch.float16)]
    with pytest.raises(RuntimeError):
        pyoptim.functional.adam_step_(half, [torch.zeros(3, dtype=torch.float16)], *base[2:], **kw,
                                      param_remainders=[torch.zeros(3, dtype=torch.int16)])


@pytest.mark.parametrize("impl", ADAM_IMPLS, ids=impl_id)
def test_groups_of_different_policies_and_state_dtypes(impl):
    # Groups that differ in policy or state dtype make separate calls; each matches its own one-group run.
    device = _device(impl)
    settings = [dict(), dict(state_dtype=torch.bfloat16), dict(master_weights="fp32"),
                dict(master_weights="remainder", state_dtype=torch.bfloat16), dict(master_weights="stochastic")]
    make = lambda: [torch.randn(9, generator=torch.Generator().manual_seed(k)).bfloat16().to(device)  # noqa: E731
                    .requires_grad_() for k in range(len(settings))]
    ps, qs = make(), make()
    fp = torch.randn(9, device=device, requires_grad=True)  # fp32 params beside them, in the first group
    fq = fp.detach().clone().requires_grad_()
    together = pyoptim.optim.AdamW([dict(params=[p] + ([fp] if k == 0 else []), **kw)
                                    for k, (p, kw) in enumerate(zip(ps, settings))], lr=1e-2, backend=impl[1])
    alone = [pyoptim.optim.AdamW([q] + ([fq] if k == 0 else []), lr=1e-2, backend=impl[1], **kw)
             for k, (q, kw) in enumerate(zip(qs, settings))]
    for _ in range(3):
        for p, q in zip(ps + [fp], qs + [fq]):
            p.grad = torch.randn(9, device=device).to(p.dtype)
            q.grad = p.grad.clone()
        together.step()
        for o in alone:
            o.step()
    for p, q in zip(ps + [fp], qs + [fq]):
        assert torch.equal(p, q)


# -- every optimizer with a policy (issue 15's remaining part) ------------------------------------------------
# (class, its op, constructor keywords): momentum on (the buffers are the state state_dtype sets) and Nesterov;
# Adagrad with a decaying lr and a nonzero first sum; RMSprop plain and with all three of its states.
OPTIMIZERS = {
    "adamw": (pyoptim.optim.AdamW, "adam_step_", dict(lr=1e-2)),
    "sgd": (pyoptim.optim.SGD, "sgd_step_", dict(lr=1e-2, momentum=0.9)),
    "sgd-nesterov": (pyoptim.optim.SGD, "sgd_step_", dict(lr=1e-2, momentum=0.9, nesterov=True)),
    "sgd-plain": (pyoptim.optim.SGD, "sgd_step_", dict(lr=1e-2)),
    "adagrad": (pyoptim.optim.Adagrad, "adagrad_step_", dict(lr=1e-2, lr_decay=0.01, initial_accumulator_value=0.1)),
    "rmsprop": (pyoptim.optim.RMSprop, "rmsprop_step_", dict(lr=1e-3)),
    "rmsprop-centered-momentum": (pyoptim.optim.RMSprop, "rmsprop_step_",
                                  dict(lr=1e-3, centered=True, momentum=0.9)),
    "lion": (pyoptim.optim.Lion, "lion_step_", dict(lr=1e-3)),
    # weight decay on: u reads the master, and so does the trust ratio's ||p||
    "lamb": (pyoptim.optim.LAMB, "lamb_step_", dict(lr=1e-2, weight_decay=0.01)),
}
OPT_IMPLS = [(name, impl) for name, (_, op, _) in OPTIMIZERS.items() for impl in impls(op)]


def _opt_id(case):
    return f"{case[0]}-{impl_id(case[1])}"


def _make(name, params, **kw):
    cls, _, base = OPTIMIZERS[name]
    return cls(params, **dict(base, **kw))


def _grads_for(params, g):
    return [torch.randn(p.shape, generator=g).bfloat16().to(p.device) for p in params]


def _twin(name, params, **kw):
    """The optimizer `name` is a drop-in for, with the same hyperparameters: torch.optim's (lion-pytorch's Lion)."""
    cls, _, base = OPTIMIZERS[name]
    if cls is pyoptim.optim.Lion:
        lion_pytorch = pytest.importorskip("lion_pytorch", reason="Lion's twin, lion-pytorch, is not installed")
        return lion_pytorch.Lion(params, **base)
    return getattr(torch.optim, cls.__name__)(params, **base, **kw)


@pytest.mark.parametrize("case", OPT_IMPLS, ids=_opt_id)
@pytest.mark.parametrize("policy", ["fp32", "remainder"])
def test_every_optimizer_masters_bit_identical(case, policy):
    # The masters equal an fp32-param run fed the same grads, bit for bit, over two groups (weight decay on
    # in one, off in the other), 100 steps (30 under the Triton interpreter).
    name, impl = case
    device = _device(impl)
    steps = 100 if impl[1] != "triton" else 30
    ref = [p.clone().requires_grad_() for p in _init(device)]
    low = [p.bfloat16().requires_grad_() for p in _init(device)]
    o_ref = _make(name, _groups(ref, 0.05), backend=impl[1])
    o_low = _make(name, _groups(low, 0.05), backend=impl[1], master_weights=policy)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        for a, b, gr in zip(ref, low, _grads_for(ref, g)):
            a.grad, b.grad = gr.float(), gr.clone()
        o_ref.step()
        o_low.step()
        if step % 10 == 9 or step == 0:
            for a, m in zip(ref, _masters(o_low, low, policy)):
                assert torch.equal(m, a.detach()), f"{name}: master differs at step {step + 1}"
    for b, a in zip(low, ref):
        if policy == "fp32":
            assert torch.equal(b.detach(), a.detach().bfloat16())
        for k, v in o_low.state[b].items():
            if k not in ("step", "master_param", "param_remainder"):
                assert v.dtype == torch.float32 and torch.equal(v, o_ref.state[a][k]), k


def _stochastic(name, impl, seed, steps=5, dtype=torch.bfloat16):
    device = _device(impl)
    ps = [p.to(dtype).requires_grad_() for p in _init(device)]
    opt = _make(name, ps, backend=impl[1], master_weights="stochastic", stochastic_seed=seed)
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        for p, gr in zip(ps, _grads_for(ps, g)):
            p.grad = gr.to(dtype)
        opt.step()
    return [p.detach().cpu() for p in ps], opt


@pytest.mark.parametrize("name", [n for n in OPTIMIZERS if n != "adamw"])
def test_every_optimizer_stochastic_reproducible_across_backends(name):
    cases = [impl for n, impl in OPT_IMPLS if n == name]
    runs = {impl: _stochastic(name, impl, seed=7)[0] for impl in cases}
    first = runs[cases[0]]
    for impl, r in runs.items():
        assert all(torch.equal(a, b) for a, b in zip(first, r)), impl
    assert any(not torch.equal(a, b) for a, b in zip(first, _stochastic(name, cases[0], seed=8)[0]))


@pytest.mark.parametrize("case", [c for c in OPT_IMPLS if c[0] == "sgd-plain"], ids=_opt_id)
def test_sgd_stochastic_unbiased(case):
    # One plain SGD step from 1.0 by lr = 3 * 2^-10 (3/8 of the bf16 ulp above 1): the mean of n roundings
    # within 4 standard errors of 1 + lr, only the two neighbours drawn.
    impl = case[1]
    n, lr = 1 << 14, 3 * 2**-10
    p = torch.ones(n, dtype=torch.bfloat16, device=_device(impl), requires_grad=True)
    opt = pyoptim.optim.SGD([p], lr=lr, backend=impl[1], master_weights="stochastic", stochastic_seed=3)
    p.grad = torch.full_like(p, -1.0)
    opt.step()
    vals = p.detach().float().cpu()
    lo, hi = 1.0, 1.0 + 2**-7
    assert ((vals == lo) | (vals == hi)).all()
    frac = lr / (hi - lo)
    se = (frac * (1 - frac) / n) ** 0.5 * (hi - lo)
    assert abs(float(vals.double().mean()) - (1.0 + lr)) <= 4 * se
    assert float(opt.state[p]["step"]) == 1.0  # SGD's counter for the draws


def _bf16_and_fp32_state_runs(make, device, param_dtype, keys, check_first=None, steps=5, param_atol=1e-3):
    """`steps` steps of make(params, state_dtype) with bf16 state, then fp32 state, fed the same grads;
    check_first(opt, params) after the first step. Then the bf16 run's state at `keys` stays within a few bf16
    roundings of the fp32 run's (one rounding a step, damped or over at most 5 steps: 2^-6 relative, or 2^-6 of
    the largest value for states near 0), and its params within two bf16 ulps (a state's rounding may flip a
    bf16 param's rounding) or `param_atol`."""
    runs = {}
    for sd in (torch.bfloat16, torch.float32):
        ps = [p.to(param_dtype).requires_grad_() for p in _init(device)]
        opt = make(ps, sd)
        g = torch.Generator().manual_seed(4)
        for step in range(steps):
            for p, gr in zip(ps, _grads_for(ps, g)):
                p.grad = gr.to(param_dtype)
            opt.step()
            if step == 0 and check_first is not None:
                check_first(opt, ps)
        runs[sd] = [(p.detach().float(), [opt.state[p][k] for k in keys]) for p in ps]
    for (p, st), (p32, st32) in zip(runs[torch.bfloat16], runs[torch.float32]):
        for b, b32 in zip(st, st32):
            assert b.dtype == torch.bfloat16 and b32.dtype == torch.float32
            torch.testing.assert_close(b.float(), b32, rtol=2**-6, atol=2**-6 * float(b32.abs().max()))
        torch.testing.assert_close(p, p32, rtol=2**-6, atol=param_atol)


@pytest.mark.parametrize("case", [c for c in OPT_IMPLS if c[0] == "sgd"], ids=_opt_id)
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_sgd_bf16_momentum_buffers(case, param_dtype):
    # state_dtype=bf16: the first buffer is the grad (bf16 values: exact); later ones as _bf16_and_fp32_state_runs.
    impl = case[1]

    def first_buffer_is_the_grad(opt, ps):
        for p in ps:
            assert torch.equal(opt.state[p]["momentum_buffer"], p.grad.bfloat16())

    _bf16_and_fp32_state_runs(
        lambda ps, sd: pyoptim.optim.SGD(ps, lr=1e-2, momentum=0.9, backend=impl[1], state_dtype=sd),
        _device(impl), param_dtype, ("momentum_buffer",), first_buffer_is_the_grad)


@pytest.mark.parametrize("kwargs, dtype", [
    (dict(master_weights="remainder"), torch.float16),
    (dict(master_weights="remainder"), torch.float32),
    (dict(master_weights="bf16"), torch.bfloat16),
    (dict(state_dtype=torch.int8), torch.float32),
    (dict(state_dtype=torch.float16), torch.float32),
    (dict(state_dtype=torch.float32), torch.float64),
])
@pytest.mark.parametrize("name", [n for n in OPTIMIZERS if n != "adamw"])
def test_every_optimizer_bad_combinations_raise(name, kwargs, dtype):
    p = torch.zeros(3, dtype=dtype, requires_grad=True)
    with pytest.raises(ValueError):
        _make(name, [p], **kwargs)
    with pytest.raises(ValueError):
        _make(name, [dict(params=[p], **kwargs)])


def _run(name, opt, ps, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p, gr in zip(ps, _grads_for(ps, g)):
            p.grad = gr.to(p.dtype)
        opt.step()


@pytest.mark.parametrize("policy", [None, "fp32", "remainder", "stochastic"])
@pytest.mark.parametrize("name", [n for n in OPTIMIZERS if n != "adamw"])
def test_every_optimizer_checkpoint_resumes_exactly(name, policy):
    ps = [p.bfloat16().requires_grad_() for p in _init(torch.device("cpu"))]
    kw = dict(master_weights=policy, state_dtype=torch.bfloat16 if policy == "remainder" else None,
              stochastic_seed=5, backend="reference")
    opt = _make(name, ps, **kw)
    _run(name, opt, ps, 3, 9)
    sd = copy.deepcopy(opt.state_dict())
    qs = [p.detach().clone().requires_grad_() for p in ps]
    fresh = _make(name, qs, **dict(kw, stochastic_seed=0))  # the checkpoint's seed wins
    fresh.load_state_dict(sd)
    # (plain SGD without a policy keeps no state: both sides empty)
    assert {k: v.dtype for k, v in fresh.state[qs[0]].items()} == {
        k: v.dtype for k, v in sd["state"].get(0, {}).items()}
    _run(name, opt, ps, 3, 10)
    _run(name, fresh, qs, 3, 10)
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)
        for k, v in opt.state[p].items():
            assert torch.equal(v, fresh.state[q][k]), k


@pytest.mark.parametrize("name", [n for n in OPTIMIZERS if n != "adamw"])
def test_every_optimizer_checkpoint_across_policies_and_torch(name):
    # "fp32" -> "remainder" -> "fp32" keeps the masters exactly; None -> "stochastic" starts its counter (SGD's
    # and Lion's; Adagrad and RMSprop go on with their own step); a torch.optim checkpoint loads into a policy
    # and one without a policy goes back to torch exactly.
    ps = [p.bfloat16().requires_grad_() for p in _init(torch.device("cpu"))]
    opt = _make(name, ps, master_weights="fp32", backend="reference")
    _run(name, opt, ps, 4, 3)
    masters = [opt.state[p]["master_param"].clone() for p in ps]
    qs = [p.detach().clone().requires_grad_() for p in ps]
    rem = _make(name, qs, master_weights="remainder", backend="reference")
    rem.load_state_dict(opt.state_dict())
    for q, m in zip(qs, masters):
        assert torch.equal(param_fp32(q, 0, None, [rem.state[q]["param_remainder"]]), m)
    rs = [q.detach().clone().requires_grad_() for q in qs]
    back = _make(name, rs, master_weights="fp32", backend="reference")
    back.load_state_dict(rem.state_dict())
    assert all(torch.equal(back.state[r]["master_param"], m) for r, m in zip(rs, masters))
    sto = _make(name, [r.detach().clone().requires_grad_() for r in rs], master_weights="stochastic",
                backend="reference")
    sto.load_state_dict(back.state_dict())
    own_step = "step" in back.state[rs[0]]
    before = [float(sto.state[p]["step"]) for p in sto.param_groups[0]["params"]]
    assert all(b == (4.0 if own_step else 0.0) for b in before)
    _run(name, sto, sto.param_groups[0]["params"], 1, 4)
    assert all(float(sto.state[p]["step"]) == b + 1 for p, b in zip(sto.param_groups[0]["params"], before))
    if OPTIMIZERS[name][0] is pyoptim.optim.LAMB:
        return  # (LAMB has no torch.optim twin: its checkpoints without a policy are test_lamb.py's)
    tp = [p.detach().clone().requires_grad_() for p in ps]
    t = _twin(name, tp, foreach=False)
    _run(name, t, tp, 2, 5)
    up = [p.detach().clone().requires_grad_() for p in tp]
    ours = _make(name, up, backend="reference")
    ours.load_state_dict(t.state_dict())
    t2 = _twin(name, [p.detach().clone().requires_grad_() for p in up])
    t2.load_state_dict(ours.state_dict())
    for a, b in zip(t.state_dict()["state"].values(), t2.state_dict()["state"].values()):
        for k in a:
            assert torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype, k


@pytest.mark.parametrize("policy", ["fp32", "remainder", "stochastic"])
@pytest.mark.parametrize("case", [c for c in OPT_IMPLS if c[0] != "adamw"], ids=_opt_id)
def test_every_optimizer_grad_scaler_and_clip_with_policy(case, policy):
    # found_inf skips the step (params and state untouched, the stochastic counter too); max_grad_norm clips
    # as torch's clip_grad_norm_ before an fp32 run's step: the masters match that run.
    name, impl = case
    device = _device(impl)
    ps = [p.bfloat16().requires_grad_() for p in _init(device)]
    opt = _make(name, ps, backend=impl[1], master_weights=policy)
    _run(name, opt, ps, 2, 6)
    _assert_found_inf_skips(opt, ps, policy)
    if policy == "stochastic":
        return
    ref = [p.clone().requires_grad_() for p in _init(device)]
    low = [p.bfloat16().requires_grad_() for p in _init(device)]
    o_ref = _make(name, ref, backend=impl[1])
    o_low = _make(name, low, backend=impl[1], master_weights=policy, max_grad_norm=0.5)
    g = torch.Generator().manual_seed(8)
    for _ in range(3):
        for a, b, gr in zip(ref, low, _grads_for(ref, g)):
            a.grad, b.grad = gr.float(), gr.clone()
        torch.nn.utils.clip_grad_norm_(ref, 0.5)
        o_ref.step()
        o_low.step()
    for a, m in zip(ref, _masters(o_low, low, policy)):
        # The fused clip scales inside the kernel, torch's clip multiplies the grads first: equal to fp32 rounding.
        torch.testing.assert_close(m, a.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", [n for n in OPTIMIZERS if n != "lamb"])  # (LAMB takes no flat=True at all)
@pytest.mark.parametrize("kwargs", [dict(master_weights="fp32"), dict(state_dtype=torch.bfloat16)])
def test_flat_with_a_policy_raises_naming_it(name, kwargs):
    # Not built (README, "Low precision"): a clear error at construction, before any state exists.
    p = torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(ValueError, match="flat=True with master_weights"):
        _make(name, [p], flat=True, **kwargs)


@pytest.mark.parametrize("policy, state_dtype, want", [
    (None, None, 4), ("fp32", None, 10), ("remainder", None, 8), ("remainder", torch.bfloat16, 6),
    ("stochastic", None, 6), ("stochastic", torch.bfloat16, 4)])
def test_sgd_bytes_per_param(policy, state_dtype, want):
    # The README's table: bf16 SGD with momentum, param + per-element state (0-d steps not counted).
    p = torch.zeros(1000, dtype=torch.bfloat16, requires_grad=True)
    opt = pyoptim.optim.SGD([p], lr=0.1, momentum=0.9, master_weights=policy, state_dtype=state_dtype,
                            backend="reference")
    p.grad = torch.zeros_like(p)
    opt.step()
    state_bytes = sum(t.numel() * t.element_size() for t in opt.state[p].values() if t.dim() > 0)
    assert (state_bytes + p.numel() * p.element_size()) / p.numel() == want


# The per-element state each optimizer keeps, by name (its bf16 state as state_dtype=torch.bfloat16 makes it).
_ELEMENT_STATE = {"adagrad": ("sum",), "rmsprop": ("square_avg",),
                  "rmsprop-centered-momentum": ("square_avg", "grad_avg", "momentum_buffer"), "lion": ("exp_avg",)}


@pytest.mark.parametrize("case", [c for c in OPT_IMPLS if c[0] in _ELEMENT_STATE], ids=_opt_id)
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_every_optimizer_bf16_state(case, param_dtype):
    # state_dtype=bf16: every per-element state is bf16 from the start (Adagrad's sum is
    # initial_accumulator_value rounded to bf16) and stays as _bf16_and_fp32_state_runs holds it (5 steps, 3
    # under the Triton interpreter); for Lion the params also within one sign flip (a state's rounding may
    # flip the sign of a near-zero update: 2 lr).
    name, impl = case

    def make(ps, sd):
        opt = _make(name, ps, backend=impl[1], state_dtype=sd)
        if name == "adagrad":
            for p in ps:
                want = torch.full_like(p, 0.1, dtype=sd)
                assert opt.state[p]["sum"].dtype == sd and torch.equal(opt.state[p]["sum"], want)
        return opt

    atol = 1e-3 + (2 * OPTIMIZERS[name][2]["lr"] if name == "lion" else 0.0)
    _bf16_and_fp32_state_runs(make, _device(impl), param_dtype, _ELEMENT_STATE[name],
                              steps=5 if impl[1] != "triton" else 3, param_atol=atol)


# bytes per bf16 param (param + per-element state, 0-d steps not counted) for each policy and state dtype: the
# README's table, for one per-element state tensor (Adagrad, RMSprop, Lion) and for three (RMSprop, centered,
# with momentum).
_POLICY_CASES = [(None, None), ("fp32", None), ("remainder", None), ("remainder", torch.bfloat16),
                 ("stochastic", None), ("stochastic", torch.bfloat16)]
_BYTES = {1: (4, 10, 8, 6, 6, 4), 3: (8, 18, 16, 10, 14, 8)}


@pytest.mark.parametrize("name", list(_ELEMENT_STATE))
@pytest.mark.parametrize("i", range(len(_POLICY_CASES)), ids=lambda i: f"{_POLICY_CASES[i][0]}-{_POLICY_CASES[i][1]}")
def test_every_optimizer_bytes_per_param(name, i):
    policy, state_dtype = _POLICY_CASES[i]
    want = _BYTES[len(_ELEMENT_STATE[name])][i]
    p = torch.zeros(1000, dtype=torch.bfloat16, requires_grad=True)
    opt = _make(name, [p], master_weights=policy, state_dtype=state_dtype, backend="reference")
    p.grad = torch.ones_like(p)
    opt.step()
    state_bytes = sum(t.numel() * t.element_size() for t in opt.state[p].values() if t.dim() > 0)
    assert (state_bytes + p.numel() * p.element_size()) / p.numel() == want


@pytest.mark.parametrize("policy, state_dtype, want", [
    (None, None, 6), ("fp32", None, 14), ("remainder", None, 12), ("remainder", torch.bfloat16, 8),
    ("stochastic", None, 10), ("stochastic", torch.bfloat16, 6)])
def test_lamb_bytes_per_param(policy, state_dtype, want):
    # The README's table: bf16 LAMB, param + per-element state (0-d steps not counted).
    p = torch.zeros(1000, dtype=torch.bfloat16, requires_grad=True)
    opt = pyoptim.optim.LAMB([p], lr=0.1, master_weights=policy, state_dtype=state_dtype, backend="reference")
    p.grad = torch.zeros_like(p)
    opt.step()
    state_bytes = sum(t.numel() * t.element_size() for t in opt.state[p].values() if t.dim() > 0)
    assert (state_bytes + p.numel() * p.element_size()) / p.numel() == want


@pytest.mark.skipif(not pyoptim._backends.EXTENSION_LOADED, reason="the extension is not built")
@pytest.mark.parametrize("policy", ["fp32", "remainder", "stochastic", "bf16state"])
@pytest.mark.parametrize("op", ["adagrad_step_", "rmsprop_step_", "lion_step_"])
def test_every_optimizer_opcheck(op, policy):
    # The schemas' aliasing of master_params / param_remainders / Lion's state_steps, the fake kernels and the
    # CPU kernels agree (as test_opcheck for adam_step_).
    shapes = [(5,), (2, 3), ()]
    p = [torch.randn(s).bfloat16() for s in shapes]
    g = [torch.randn(s).bfloat16() for s in shapes]
    state_dtype = torch.bfloat16 if policy == "bf16state" else torch.float32
    st = lambda: [torch.randn(s).abs().to(state_dtype) for s in shapes]  # noqa: E731
    steps = lambda: [torch.tensor(2.0) for _ in shapes]  # noqa: E731
    common = dict(lr=[1e-3], weight_decay=[0.1], group_sizes=[3], maximize=False)
    if op == "adagrad_step_":
        args, kwargs = (p, g, st(), steps()), dict(common, lr_decay=[0.01], eps=[1e-10])
    elif op == "rmsprop_step_":
        sa = [t + 1 for t in st()]  # square_avg - grad_avg^2 > 0: centered's sqrt is real
        args = (p, g, sa, [t * 0.1 for t in st()], st(), steps())
        kwargs = dict(common, alpha=[0.99], eps=[1e-8], momentum=[0.9], centered=True)
    else:
        args, kwargs = (p, g, st()), dict(common, beta1=[0.9], beta2=[0.99])
    if policy == "fp32":
        kwargs["master_params"] = [x.float() for x in p]
    elif policy == "remainder":
        kwargs["param_remainders"] = [torch.zeros(s, dtype=torch.int16) for s in shapes]
    elif policy == "stochastic":
        kwargs["stochastic_seed"] = 11
        if op == "lion_step_":
            kwargs["state_steps"] = steps()
    torch.library.opcheck(getattr(torch.ops.pyoptim, op), args, kwargs)


@pytest.mark.parametrize("policy", ["fp32", "remainder"])
def test_adagrad_master_from_the_param_at_its_first_step(policy):
    # Adagrad makes its state at construction (torch's); a policy's master or remainder waits for the first step,
    # so weights loaded into the model after the optimizer was built are what the masters start from.
    p = torch.zeros(8, dtype=torch.bfloat16, requires_grad=True)
    opt = pyoptim.optim.Adagrad([p], lr=0.1, master_weights=policy, backend="reference")
    assert set(opt.state[p]) == {"step", "sum"}
    with torch.no_grad():
        p.copy_(torch.linspace(-2, 2, 8))
    ref = p.detach().float().requires_grad_()
    o_ref = pyoptim.optim.Adagrad([ref], lr=0.1, backend="reference")
    for _ in range(3):
        p.grad = torch.linspace(1, -1, 8).bfloat16()
        ref.grad = p.grad.float()
        opt.step()
        o_ref.step()
    assert torch.equal(_masters(opt, [p], policy)[0], ref.detach())


@pytest.mark.parametrize("case", [c for c in OPT_IMPLS if c[0] == "lamb"], ids=_opt_id)
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_lamb_bf16_state(case, param_dtype):
    # state_dtype=bf16: exp_avg and exp_avg_sq in the state dtype, the first exp_avg (1 - beta1) * g rounded once
    # to it (one bf16 ulp: 2^-8); later ones as _bf16_and_fp32_state_runs (the trust ratio normalises u, so a
    # moment's rounding moves the step's direction, not its size).
    impl = case[1]

    def first_moments(opt, ps):
        for p in ps:
            st = opt.state[p]
            sd = st["exp_avg"].dtype
            assert st["exp_avg_sq"].dtype == sd
            torch.testing.assert_close(st["exp_avg"], (0.1 * p.grad.float()).to(sd), rtol=2**-8, atol=0)

    _bf16_and_fp32_state_runs(
        lambda ps, sd: pyoptim.optim.LAMB(ps, lr=1e-2, weight_decay=0.01, backend=impl[1], state_dtype=sd),
        _device(impl), param_dtype, ("exp_avg", "exp_avg_sq"), first_moments)


@pytest.mark.parametrize("case", [c for c in OPT_IMPLS if c[0] == "lamb"], ids=_opt_id)
@pytest.mark.parametrize("policy", ["fp32", "remainder", "stochastic"])
def test_lamb_two_passes_equal_one_step_with_policy(case, policy):
    # note [LAMB's two passes]: lamb_moments_ (the masters read, not written) then lamb_apply_ over its norms
    # is lamb_step_, bit for bit, under each policy; the norms' ||p||^2 row is the masters' (fp32) norm.
    from pyoptim import functional

    impl = case[1]
    device = _device(impl)
    results = []
    for two in (False, True):
        ps = [p.bfloat16() for p in _init(device)]
        ms = [torch.zeros(p.shape, device=device) for p in ps]
        vs = [torch.zeros(p.shape, device=device) for p in ps]
        steps = [torch.zeros((), device=device) for _ in ps]
        masters = [p.float() + 2**-12 for p in ps]  # off the bf16 grid: ||p|| must be the master's
        extra = dict(master_params=masters) if policy == "fp32" else {}
        if policy == "remainder":
            extra = dict(param_remainders=[torch.zeros(p.shape, dtype=torch.int16, device=device) for p in ps])
        if policy == "stochastic":
            extra = dict(stochastic_seed=11)
        g = torch.Generator().manual_seed(3)
        grads = _grads_for(ps, g)
        kw = dict(lr=[1e-2], beta1=[0.9], beta2=[0.999], weight_decay=[0.01], eps=[1e-6], maximize=False,
                  backend=impl[1], **extra)
        before = [t.clone() for t in masters] if policy == "fp32" else None
        if two:
            norms = functional.lamb_moments_(ps, grads, ms, vs, steps, **kw)
            if policy == "fp32":
                assert all(torch.equal(a, b) for a, b in zip(masters, before))  # read only
                want = torch.stack([t.double().square().sum() for t in masters])
                torch.testing.assert_close(norms[0].cpu(), want.cpu(), rtol=1e-6, atol=0)
            functional.lamb_apply_(ps, grads, ms, vs, steps, norms, **kw)
        else:
            functional.lamb_step_(ps, grads, ms, vs, steps, **kw)
        results.append([t.cpu() for t in ps + ms + vs + list(extra.get("master_params", []))
                        + list(extra.get("param_remainders", []))])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.skipif(not pyoptim._backends.EXTENSION_LOADED, reason="the extension is not built")
@pytest.mark.parametrize("policy", ["fp32", "remainder", "stochastic", "bf16state"])
def test_lamb_opcheck(policy):
    # The three LAMB ops' schemas (lamb_moments_ reads the masters/remainders, lamb_step_ and lamb_apply_ write
    # them), their fake kernels and the CPU kernels agree under each policy.
    shapes = [(5,), (2, 3), ()]
    p = [torch.randn(s).bfloat16() for s in shapes]
    state_dtype = torch.bfloat16 if policy == "bf16state" else torch.float32

    def args():
        st = [torch.randn(s).abs().to(state_dtype) for s in shapes]
        return (p, [torch.randn(s).bfloat16() for s in shapes], [x.clone() for x in st], st,
                [torch.tensor(2.0) for _ in shapes])

    kwargs = dict(lr=[1e-3], beta1=[0.9], beta2=[0.999], weight_decay=[0.1], eps=[1e-6], group_sizes=[3],
                  maximize=False)
    if policy == "fp32":
        kwargs["master_params"] = [x.float() + 2**-12 for x in p]
    elif policy == "remainder":
        kwargs["param_remainders"] = [torch.full(s, 77, dtype=torch.int16) for s in shapes]
    elif policy == "stochastic":
        kwargs["stochastic_seed"] = 11
    torch.library.opcheck(torch.ops.pyoptim.lamb_step_, args(), kwargs)
    torch.library.opcheck(torch.ops.pyoptim.lamb_moments_, args(), kwargs)
    a = args()
    norms = torch.ops.pyoptim.lamb_moments_(*copy.deepcopy(a), **copy.deepcopy(kwargs))
    torch.library.opcheck(torch.ops.pyoptim.lamb_apply_, a + (norms,), kwargs)
