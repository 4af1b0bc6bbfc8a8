"""The Triton norm launchers as dispatcher ops, so that torch.compile sees them (note [triton ops]).

note [triton ops]: torch.ops.pyoptim.<op>_triton is the launcher <op>_triton
of kernels/layer_norm.py or kernels/batch_norm.py as an op with the schema
of the C++ op <op> (csrc/ops.cpp); pyoptim.functional gives the forward ops
their autograd formula, so a model's norm compiles with fullgraph=True on
this backend as on the C++ ones (the raw launcher under an
autograd.Function is a graph break). Two ways, chosen once:

- torch.library.triton_op where torch has it and Triton compiles the
  kernels: the compiler traces into the launcher and sees each kernel
  (through wrap_triton, the launch() below), so Inductor can schedule them
  with the rest of the graph;
- torch.library.custom_op otherwise, an opaque op whose fake runs the
  launcher with its launches skipped (launch() again): under
  TRITON_INTERPRET=1, where a kernel is an InterpretedFunction that
  wrap_triton cannot trace (it reads the data of the fake tensors), and on a
  torch without triton_op.

Either way eager calls launch the kernels directly, as the launchers always did.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ._multi_tensor import interpret

__all__ = ["launch", "register_op", "register_dispatched_op", "dispatched_name", "traces_into_kernels", "TRACES_INTO_KERNELS", "MODE"]

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def traces_into_kernels(library: Any = torch.library, interpreting: bool | None = None) -> bool:
    """Whether the ops can be triton_ops the compiler traces into: `library` (torch.library) has triton_op and
    wrap_triton (torch >= 2.6) and Triton compiles the kernels (not under TRITON_INTERPRET=1)."""
    interpreting = interpret() if interpreting is None else interpreting
    return hasattr(library, "triton_op") and hasattr(library, "wrap_triton") and not interpreting


#: whether the ops are triton_ops the compiler traces into (else opaque custom ops), chosen once
TRACES_INTO_KERNELS = traces_into_kernels()
#: the choice in words, for backend_info() and `python -m pyoptim info`
MODE = ("triton_op (torch.compile traces into the kernels)" if TRACES_INTO_KERNELS else
        "custom_op (opaque to torch.compile: " + ("TRITON_INTERPRET=1" if interpret() else
                                                 "this torch has no torch.library.triton_op") + ")")


class _NoLaunch:
    """A launch that does nothing: the opaque op's fake only needs the launcher's outputs' shapes."""

    def __getitem__(self, grid: Any) -> "_NoLaunch":
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        return None


_NO_LAUNCH = _NoLaunch()


def launch(kernel: Any, probe: torch.Tensor) -> Any:
    """`kernel` as a launcher launches it (launch(kernel, x)[grid](...)): itself on real tensors outside any
    tracing; wrap_triton's traceable kernel while a triton_op is traced; a no-op in the opaque op's fake."""
    if type(probe) in _PLAIN and _get_current_dispatch_mode() is None:
        return kernel
    if TRACES_INTO_KERNELS:
        return torch.library.wrap_triton(kernel)
    return _NO_LAUNCH


def register_op(name: str, schema: str, launcher: Callable[..., Any]) -> None:
    """Register `launcher` as the op pyoptim::`name` with `schema` (arguments and returns, no name)."""
    qualname = f"pyoptim::{name}"
    if TRACES_INTO_KERNELS:
        torch.library.triton_op(qualname, launcher, mutates_args=(), schema=schema)
    else:
        op = torch.library.custom_op(qualname, launcher, mutates_args=(), schema=schema)
        op.register_fake(launcher)


# note [triton step ops]: the Triton launchers of the optimizer ops (the
# steps, the clip's norm and scale) as dispatcher ops too, so that a
# compiled optimizer.step() on this backend traces them (fullgraph=True)
# instead of breaking the graph at each call. Their schema is the C++ op's
# (csrc/ops.cpp), read from the loaded library: one place says what the ops
# take, and a Triton launcher that differs from it fails the compile tests.
# The C++ schemas have kwarg-only tensors (lr_tensor, grad_scale, ...), which
# custom_op refuses, so these are defined on a torch.library.Library
# fragment: the launcher serves every device (CompositeExplicitAutograd),
# and the fake is the reference for an op with outputs (same contract, and
# plain torch ops run on fake tensors) or nothing for an in-place op. They
# stay opaque to the compiler (a step has no output to fuse with); without
# the library the Triton optimizer ops run eagerly inside a compiled step.
_STEP_LIB: torch.library.Library | None = None


def dispatched_name(op: str) -> str:
    """The name of the Triton op of optimizer op `op`: adam_step_ -> adam_step_triton_ (in place, as the C++ op),
    multi_tensor_norm -> multi_tensor_norm_triton."""
    return op.rstrip("_") + "_triton" + ("_" if op.endswith("_") else "")


def register_dispatched_op(op: str, launcher: Callable[..., Any], reference: Callable[..., Any]) -> Any:
    """torch.ops.pyoptim.<dispatched_name(op)>: the Triton `launcher` of optimizer op `op` with the C++ op's schema (note
    [triton step ops]); None where the C++ op is not loaded."""
    global _STEP_LIB
    cpp = getattr(getattr(torch.ops.pyoptim, op, None), "default", None)
    if cpp is None:
        return None
    name = dispatched_name(op)
    if not hasattr(torch.ops.pyoptim, name):
        if _STEP_LIB is None:
            _STEP_LIB = torch.library.Library("pyoptim", "FRAGMENT")
        schema = str(cpp._schema)
        _STEP_LIB.define(name + schema[schema.index("("):])
        _STEP_LIB.impl(name, launcher, "CompositeExplicitAutograd")
        fake = reference if cpp._schema.returns else (lambda *args, **kwargs: None)
        torch.library.register_fake(f"pyoptim::{name}", fake, lib=_STEP_LIB)
    return getattr(torch.ops.pyoptim, name)
