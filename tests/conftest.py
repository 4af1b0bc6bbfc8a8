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
