"""Large and hostile inputs: tensors past 2^31 elements, NaN and inf, aliased and misplaced tensors.

The large-tensor tests run where this machine's memory allows (they say how
much they need when they skip); on CUDA where a GPU is present.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import pyoptim
from pyoptim import _backends
from tests.conftest import HAS_CUDA, TOL, impls

BIG = 2**31 + 65539  # int32 indexing would wrap; the odd tail crosses a chunk and a vector
GiB = 1 << 30


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _big_devices(op: str, backend_cpu: str = "cpu") -> list[tuple[str, str]]:
    """(device type, backend) pairs that are compiled code: the interpreter and the reference cannot walk 2^31."""
    out = []
    for device_type, backend in impls(op):
        if (device_type == "cpu" and backend == backend_cpu) or (device_type == "cuda" and backend != "reference"):
            out.append((device_type, backend))
    return out


def _need(device: torch.device, nbytes: int) -> None:
    free = _available_bytes(device)
    if free < nbytes + 2 * GiB:
        pytest.skip(f"needs {(nbytes + 2 * GiB) / GiB:.1f} GiB of free {device.type} memory, {free / GiB:.1f} here")


# Element windows that a wrapped int32 index would read from the wrong place.
WINDOWS = [slice(0, 4096), slice(2**31 - 2048, 2**31 + 2048), slice(BIG - 4096, BIG)]


@pytest.mark.slow
@pytest.mark.parametrize("impl", _big_devices("multi_tensor_norm"), ids=lambda p: f"{p[0]}-{p[1]}")
def test_clip_grad_norm_over_2_pow_31_bf16_elements(impl):
    """The total norm of a bf16 grad of 2^31 + 65539 elements, and the clip's scale, where every element past
    2^31 counts: values only in the windows, so a wrapped index reads zeros (or the wrong window)."""
    device = torch.device(impl[0])
    _need(device, BIG * 2)
    # A param of the grad's shape and dtype that takes no memory (stride 0): the grad is what is read.
    p = torch.zeros((), dtype=torch.bfloat16, device=device).expand(BIG).requires_grad_()
    g = torch.zeros(BIG, dtype=torch.bfloat16, device=device)
    gen = torch.Generator().manual_seed(0)
    for w in WINDOWS:
        g[w] = torch.randn(w.stop - w.start, generator=gen).to(torch.bfloat16).to(device)
    windows = [g[w].double().cpu() for w in WINDOWS]
    exact = float(torch.cat(windows).norm())
    p.grad = g
    total = pyoptim.nn.utils.clip_grad_norm_([p], max_norm=exact / 4, backend=impl[1])
    torch.testing.assert_close(float(total), exact, rtol=1e-6, atol=0)
    for w, before in zip(WINDOWS, windows):
        # Scaled by max_norm / (total + 1e-6), as torch; bf16 rounds the product.
        torch.testing.assert_close(g[w].double().cpu(), (before * (exact / 4) / (exact + 1e-6)).bfloat16().double(),
                                   rtol=0, atol=2 ** -7)
    inf = pyoptim.nn.utils.clip_grad_norm_([p], max_norm=1e30, norm_type=float("inf"), backend=impl[1])
    assert float(inf) == float(g.abs().max())


@pytest.mark.slow
@pytest.mark.parametrize("impl", _big_devices("layer_norm_fwd"), ids=lambda p: f"{p[0]}-{p[1]}")
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_norm_over_2_pow_31_bf16_elements(impl, rms):
    """LayerNorm/RMSNorm forward and input grad over a bf16 input of more than 2^31 elements: the rows at and
    past element 2^31 equal torch's on the same rows."""
    device = torch.device(impl[0])
    n = 4096
    rows = 2**31 // n + 3  # 2^31 + 12288 elements; row 2^31 / n starts at element 2^31
    _need(device, 3 * rows * n * 2)  # x, y, dx
    gen = torch.Generator().manual_seed(0)
    tile = torch.randn(64, n, generator=gen).to(torch.bfloat16).to(device)
    x = torch.empty(rows, n, dtype=torch.bfloat16, device=device)
    whole = rows // 64 * 64
    x[:whole].view(-1, 64, n).copy_(tile)
    x[whole:] = tile[: rows - whole]
    check = [0, 1, 2**31 // n - 1, 2**31 // n, rows - 1]  # rows a wrapped index would confuse with the first ones
    x[check[2:]] = torch.randn(len(check) - 2, n, generator=gen).to(torch.bfloat16).to(device) * 3 + 1
    w = torch.randn(n, generator=gen).to(torch.bfloat16).to(device)
    b = None if rms else torch.randn(n, generator=gen).to(torch.bfloat16).to(device)
    x.requires_grad_()
    if rms:
        y = pyoptim.nn.functional.rms_norm(x, (n,), w, 1e-5, backend=impl[1])
    else:
        y = pyoptim.nn.functional.layer_norm(x, (n,), w, b, 1e-5, backend=impl[1])
    y.backward(x.detach())  # dy = x: no fourth buffer of 4 GiB
    xs = x.detach()[check].clone().requires_grad_()
    ys = F.rms_norm(xs, (n,), w, 1e-5) if rms else F.layer_norm(xs, (n,), w, b, 1e-5)
    ys.backward(xs.detach())
    bf16 = dict(rtol=2 ** -7, atol=2 ** -6)  # a rounding or two of bf16 apart (fp32 math in both)
    torch.testing.assert_close(y.detach()[check], ys.detach(), **bf16)
    torch.testing.assert_close(x.grad[check], xs.grad, **bf16)


# -- NaN and inf: torch's results ------------------------------------------------------


def _with_nonfinite(t: torch.Tensor, kind: str) -> torch.Tensor:
    t = t.clone()
    flat = t.view(-1)
    if kind == "nan":
        flat[1] = float("nan")
    elif kind == "inf":
        flat[1] = float("inf")
        flat[-1] = float("-inf")
    return t


@pytest.mark.parametrize("kind", ["nan", "inf"])
@pytest.mark.parametrize("name,impl", [("AdamW", i) for i in impls("adam_step_")] +
                         [("Adam", i) for i in impls("adam_step_")] + [("SGD", i) for i in impls("sgd_step_")],
                         ids=lambda v: v if isinstance(v, str) else f"{v[0]}-{v[1]}")
def test_nonfinite_grads_propagate_as_torchs(name, impl, kind):
    """A NaN/inf grad element gives the params and state torch's for-loop gives (NaN where torch has NaN)."""
    device = torch.device(impl[0])
    init = [torch.randn(37, device=device), torch.randn(4, 5, device=device)]
    kw = dict(lr=0.1, momentum=0.9) if name == "SGD" else dict(lr=0.1, weight_decay=0.01)
    ours_p = [p.clone().requires_grad_() for p in init]
    theirs_p = [p.clone().requires_grad_() for p in init]
    ours = getattr(pyoptim.optim, name)(ours_p, backend=impl[1], **kw)
    theirs = getattr(torch.optim, name)(theirs_p, foreach=False, **kw)
    for step in range(3):
        for a, b in zip(ours_p, theirs_p):
            g = torch.randn_like(a)
            if step == 1:
                g = _with_nonfinite(g, kind)
            a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    for a, b in zip(ours_p, theirs_p):
        torch.testing.assert_close(a, b, equal_nan=True, **TOL[torch.float32])
        for key, value in theirs.state[b].items():
            torch.testing.assert_close(ours.state[a][key], value, equal_nan=True, **TOL[torch.float32])


@pytest.mark.parametrize("impl", impls("adam_step_"), ids=lambda p: f"{p[0]}-{p[1]}")
def test_nonfinite_grads_under_grad_scaler_skip_the_step(impl):
    """GradScaler's found_inf skips the step: params and state exactly as before, the scale backed off."""
    device = torch.device(impl[0])
    p = torch.nn.Parameter(torch.randn(64, device=device))
    opt = pyoptim.optim.AdamW([p], backend=impl[1])
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10)
    scaler.scale((p * torch.randn_like(p)).sum()).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    before = p.detach().clone(), copy.deepcopy(opt.state_dict()["state"])
    scaler.scale((p * _with_nonfinite(torch.randn_like(p), "inf")).sum()).backward()
    scale = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(p.detach(), before[0])
    for key, value in opt.state_dict()["state"][0].items():
        assert torch.equal(torch.as_tensor(value), torch.as_tensor(before[1][0][key])), key
    assert scaler.get_scale() == scale * 0.5


@pytest.mark.parametrize("impl", impls("layer_norm_fwd"), ids=lambda p: f"{p[0]}-{p[1]}")
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_nonfinite_norm_input_as_torchs(impl, rms):
    """A NaN or inf in a row makes that row NaN (forward and input grad), as torch's; other rows untouched."""
    device = torch.device(impl[0])
    x = torch.randn(4, 33, device=device)
    x[1, 3] = float("nan")
    x[2, 5] = float("inf")
    w = torch.randn(33, device=device)
    dy = torch.randn_like(x)
    results = []
    for fn in ((lambda x: pyoptim.nn.functional.rms_norm(x, (33,), w, 1e-5, backend=impl[1])) if rms else
               (lambda x: pyoptim.nn.functional.layer_norm(x, (33,), w, None, 1e-5, backend=impl[1])),
               (lambda x: F.rms_norm(x, (33,), w, 1e-5)) if rms else (lambda x: F.layer_norm(x, (33,), w, None, 1e-5))):
        leaf = x.clone().requires_grad_()
        y = fn(leaf)
        y.backward(dy)
        results.append((y.detach(), leaf.grad))
    for a, e in zip(*results):
        assert torch.equal(torch.isnan(a), torch.isnan(e))
        torch.testing.assert_close(a, e, equal_nan=True, **TOL[torch.float32])


# -- aliased and misplaced tensors: a clear error, nothing written ------------------------------------


def _trained(name: str, backend: str, device: torch.device):
    ps = [torch.nn.Parameter(torch.randn(8, device=device)), torch.nn.Parameter(torch.randn(3, device=device))]
    opt = getattr(pyoptim.optim, name)(ps, backend=backend, **(dict(momentum=0.9) if name == "SGD" else {}))
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    for p in ps:
        p.grad = torch.randn_like(p)
    return ps, opt


def _snapshot(ps, opt):
    return [p.detach().clone() for p in ps], copy.deepcopy(opt.state_dict()["state"])


def _assert_unchanged(ps, opt, snap):
    for p, p0 in zip(ps, snap[0]):
        assert torch.equal(p.detach(), p0), "a param changed before the error"
    for i, s in opt.state_dict()["state"].items():
        for key, value in s.items():
            v0 = snap[1][i][key]
            assert torch.equal(torch.as_tensor(value).cpu(), torch.as_tensor(v0).cpu()), (i, key)


@pytest.mark.parametrize("name,impl", [("AdamW", i) for i in impls("adam_step_")] +
                         [("SGD", i) for i in impls("sgd_step_")],
                         ids=lambda v: v if isinstance(v, str) else f"{v[0]}-{v[1]}")
@pytest.mark.parametrize("which", [0, 1], ids=["first", "last"])
def test_grad_aliasing_its_param_raises_before_any_write(name, impl, which):
    """A grad that shares its param's memory (p.grad = p.data) would be read while written: refused."""
    ps, opt = _trained(name, impl[1], torch.device(impl[0]))
    ps[which].grad = ps[which].data
    snap = _snapshot(ps, opt)
    with pytest.raises(RuntimeError, match="grad.*alias|alias.*grad|shares memory|overlap"):
        opt.step()
    _assert_unchanged(ps, opt, snap)


@pytest.mark.parametrize("name,impl", [("AdamW", i) for i in impls("adam_step_")] +
                         [("SGD", i) for i in impls("sgd_step_")],
                         ids=lambda v: v if isinstance(v, str) else f"{v[0]}-{v[1]}")
@pytest.mark.parametrize("which", [0, 1], ids=["first", "last"])
def test_state_on_another_device_raises_before_any_write(name, impl, which):
    """A state tensor left on another device than its param (moved after load_state_dict): a clear error."""
    ps, opt = _trained(name, impl[1], torch.device(impl[0]))
    key = "momentum_buffer" if name == "SGD" else "exp_avg"
    snap = _snapshot(ps, opt)
    moved = opt.state[ps[which]][key].to("meta")
    opt.state[ps[which]][key] = moved
    with pytest.raises(RuntimeError, match="is on meta|device"):
        opt.step()
    assert opt.state[ps[which]][key] is moved
    opt.state[ps[which]][key] = snap[1][which][key].clone()  # back, to compare the rest
    _assert_unchanged(ps, opt, snap)


@pytest.mark.parametrize("name", ["AdamW", "SGD", "Lion", "LAMB"])
def test_duplicate_param_across_groups_raises_torchs_error(name):
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        getattr(pyoptim.optim, name)([{"params": [p]}, {"params": [p]}])
    opt = getattr(pyoptim.optim, name)([p])
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        opt.add_param_group({"params": [p]})
    assert len(opt.param_groups) == 1


@pytest.mark.skipif(not _backends.EXTENSION_LOADED, reason="the extension is not built")
@pytest.mark.parametrize("op", ["adam_step_", "sgd_step_"])
@pytest.mark.parametrize("bad", ["float64", "two_elements"])
def test_bad_step_counters_are_rejected_before_writing(op, bad):
    """A step counter that is not a one-element float32 tensor is named with its index (check_tensor_lists'
    check, the one place for every op's counters), and nothing is written: not the params, not the counters
    before it."""
    n = 4
    params = [torch.randn(3) for _ in range(n)]
    grads = [torch.randn(3) for _ in range(n)]
    steps = [torch.zeros(()) for _ in range(n)]
    steps[2] = torch.zeros((), dtype=torch.float64) if bad == "float64" else torch.zeros(2)
    before = [t.clone() for t in params + steps]
    if op == "adam_step_":
        call = lambda: torch.ops.pyoptim.adam_step_(  # noqa: E731
            params, grads, [torch.zeros(3) for _ in range(n)], [torch.zeros(3) for _ in range(n)], [], steps,
            lr=[1e-2], beta1=[0.9], beta2=[0.999], weight_decay=[0.0], eps=[1e-8], group_sizes=[n],
            amsgrad=False, maximize=False, decoupled_weight_decay=True)
    else:
        params, grads = [p.bfloat16() for p in params], [g.bfloat16() for g in grads]
        before = [t.clone() for t in params + steps]
        call = lambda: torch.ops.pyoptim.sgd_step_(  # noqa: E731
            params, grads, [], lr=[0.1], momentum=[0.0], dampening=[0.0], weight_decay=[0.0], group_sizes=[n],
            nesterov=False, maximize=False, is_first_step=False, stochastic_seed=7, state_steps=steps)
    with pytest.raises(RuntimeError, match=r"state_steps\[2\] must be a float32 tensor of one element"):
        call()
    for t, b in zip(params + steps, before):
        assert torch.equal(t, b)
