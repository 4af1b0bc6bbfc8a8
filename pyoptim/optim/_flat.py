"""Flat storage: a param group's params, grads and optimizer state as views of one buffer each.

note [flat storage]: with `flat=True` an optimizer moves the dense params of
each param group, per (device, dtype), into one buffer (`p.data` becomes a
view of it, in the param's own strides), gives the grads a matching buffer
and creates every per-element state tensor (exp_avg, momentum_buffer, ...)
and the `step` counters as views of buffers of their own. A steady-state
step is then one op call over one tensor per group whatever the number of
params, and the fused clip's norm one reduction over the grad buffer.

The per-param API stays as it is: state_dict() holds per-param tensors (the
views), load_state_dict() copies what it loads into the buffers, and every
param can still be stepped alone by the ordinary path. Grads stay views of
the grad buffer across backward passes, since autograd accumulates into an
existing grad in place; where a grad is a tensor of its own (the first
backward, `zero_grad(set_to_none=True)`, `p.grad = t`), the step plan copies
it into its slot and makes `p.grad` the slot view again (the copy DDP's
gradient_as_bucket_view makes). A param whose data was replaced (`p.data =
t`), a param without a grad, or steps that differ within a group make that
group's step per-param again: nothing is ever updated at the wrong address.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

# Slot offsets are multiples of 16 bytes, so a param stepped alone (the
# ordinary path) keeps the GPU kernels' 16-byte vector accesses; the gaps stay
# zero in every buffer (params, grads, state), so the update leaves them zero
# and the norm ignores them.
_ALIGN_BYTES = 16


def _dense(t: Tensor) -> bool:
    """t's elements fill numel() consecutive places of its storage, in some order of its dims (c10's
    is_non_overlapping_and_dense, which Python does not expose)."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def can_flatten(p: Tensor) -> bool:
    """A param flat storage can hold: a plain dense, real floating tensor (a DTensor or a complex param cannot)."""
    return (type(p) in (Tensor, torch.nn.Parameter) and p.layout == torch.strided and p.is_floating_point()
            and _dense(p))


class FlatUnit:
    """The params of one group, device and dtype, as views of one buffer, with their grads' and state's buffers."""

    def __init__(self, params: list[Tensor]) -> None:
        p0 = params[0]
        align = max(1, _ALIGN_BYTES // p0.element_size())
        self.params = params
        self.layouts = [(p.shape, p.stride()) for p in params]
        self.offsets = []
        total = 0
        for p in params:
            self.offsets.append(total)
            total += -(-p.numel() // align) * align
        self.numel = total
        self.index = {id(p): j for j, p in enumerate(params)}
        self.param_buffer = torch.zeros(total, dtype=p0.dtype, device=p0.device)
        self.grad_buffer = torch.zeros_like(self.param_buffer)
        self.state_buffers: dict[str, Tensor] = {}
        self.steps: Optional[Tensor] = None  # [len(params)] float32: the params' `step` counters
        with torch.no_grad():
            for j, p in enumerate(params):
                view = self.view(self.param_buffer, j)
                view.copy_(p)
                p.data = view
                if p.grad is not None:
                    slot = self.grad_slot(j)
                    slot.copy_(p.grad)
                    p.grad = slot

    def view(self, buffer: Tensor, j: int) -> Tensor:
        """Param j's slot of `buffer`, in the param's shape and strides (as flattened)."""
        shape, stride = self.layouts[j]
        return buffer.as_strided(shape, stride, self.offsets[j])

    def grad_slot(self, j: int) -> Tensor:
        return self.view(self.grad_buffer, j)

    def holds(self, j: int) -> bool:
        """Param j's data is still its slot of the param buffer."""
        p = self.params[j]
        return (p.dtype == self.param_buffer.dtype and p.device == self.param_buffer.device
                and p.data_ptr() == self.param_buffer.data_ptr() + self.offsets[j] * p.element_size()
                and (p.shape, p.stride()) == self.layouts[j])

    def rehome(self, p: Tensor, state: dict) -> None:
        """Move param p's state tensors into this unit's buffers (state[key] becomes its slot view)."""
        j = self.index[id(p)]
        with torch.no_grad():
            for key, t in list(state.items()):
                if not isinstance(t, Tensor):
                    continue
                if key == "step" and t.numel() == 1:
                    if self.steps is None:
                        self.steps = torch.zeros(len(self.params), dtype=torch.float32, device=p.device)
                    slot = self.steps[j]
                    slot.copy_(t.reshape(()))
                    state[key] = slot
                elif t.shape == p.shape and t.dtype == p.dtype and t.device == p.device:
                    buffer = self.state_buffers.get(key)
                    if buffer is None:
                        buffer = self.state_buffers[key] = torch.zeros_like(self.param_buffer)
                    slot = self.view(buffer, j)
                    if slot.data_ptr() != t.data_ptr():
                        slot.copy_(t)
                        state[key] = slot

    def in_place(self, state_of, keys: list[str]) -> bool:
        """Every param is still in its slot and its state tensors `keys` are their slot views: one call can serve them."""
        for j, p in enumerate(self.params):
            if not self.holds(j):
                return False
            st = state_of(p)
            if not st:
                return False
            for key in keys:
                t = st.get(key)
                if key == "step":
                    if self.steps is None or t is None or t.data_ptr() != self.steps[j].data_ptr():
                        return False
                else:
                    buffer = self.state_buffers.get(key)
                    if buffer is None or t is None or t.data_ptr() != self.view(buffer, j).data_ptr() \
                            or t.dtype != buffer.dtype:
                        return False
        # One counter serves the call: the ordinary path may have stepped
        # some params alone (a step where others had no grad). Checked when a
        # plan is recorded, not every step (a sync on a GPU).
        return self.steps is None or bool((self.steps == self.steps[0]).all())

    def call_entries(self, keys: list[tuple[str, str]]) -> dict[str, Tensor]:
        """The op's list entries that serve every param of the unit at once: op list name -> tensor."""
        out = {"params": self.param_buffer, "grads": self.grad_buffer}
        for name, key in keys:
            out[name] = self.steps[0] if key == "step" else self.state_buffers[key]
        return out

    def zero_grads(self) -> bool:
        """Zero every grad in one fill when all are still their slots; False (nothing done) otherwise."""
        for j, p in enumerate(self.params):
            g = p.grad
            if g is None or g.data_ptr() != self.grad_slot(j).data_ptr() or not self.holds(j):
                return False
        self.grad_buffer.zero_()
        return True
